"""powercrud's ``Conflict detected with IDs {...}`` warning, with the ids capped (``format_ids``).

While a wrapped ``check_conflict`` runs, a filter on powercrud's logger holds that line back;
the wrapper logs it again from the ids the method returned, on the same logger and level.
"""

from __future__ import annotations

import contextvars
import logging
from typing import Any

from opentelemetry.instrumentation.taskctx.tracing import STATE

from otel_taskctx.logids import format_ids

PREFIX = "Conflict detected with IDs "
_held: contextvars.ContextVar[list | None] = contextvars.ContextVar("taskctx_conflict_log")


def _hold(record: logging.LogRecord) -> bool:
    held = _held.get(None)
    if held is None or not str(record.msg).startswith(PREFIX):
        return True
    held.append(record)
    return False


def install_filter() -> None:
    logger = logging.getLogger("powercrud.async_manager")
    if _hold not in logger.filters:
        logger.addFilter(_hold)


def remove_filter() -> None:
    logging.getLogger("powercrud.async_manager").removeFilter(_hold)


def capped_check_conflict(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """wrapt wrapper of ``AsyncManager.check_conflict``: same result, capped log line."""
    if not STATE.active:
        return wrapped(*args, **kwargs)
    token = _held.set(held := [])
    try:
        conflicts = wrapped(*args, **kwargs)
    finally:
        _held.reset(token)
    if held:
        logging.getLogger(held[0].name).log(held[0].levelno, "%s%s", PREFIX, format_ids(conflicts))
    return conflicts
