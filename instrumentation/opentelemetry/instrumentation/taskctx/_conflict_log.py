"""powercrud's conflict warning, with the ids capped.

``AsyncManager.check_conflict`` logs ``Conflict detected with IDs {...}`` on its module logger
with every conflicting id: one line of 2,000 ids for a large bulk edit. The wrapper below runs
powercrud's method unchanged while a filter on that logger holds back that one line, then
logs it again from the ids the method returned, with :func:`otel_taskctx.logids.format_ids`
(the first 10, then how many more), on the same logger and at the same level, so logging
configured for powercrud sees it as before.
"""

from __future__ import annotations

import contextvars
import logging
from typing import Any

from opentelemetry.instrumentation.taskctx.tracing import STATE

from otel_taskctx.logids import format_ids

#: the logger powercrud's ``check_conflict`` writes to
POWERCRUD_LOGGER = "powercrud.async_manager"
#: how powercrud's line begins (its text is an f-string: the ids are in the message)
CONFLICT_PREFIX = "Conflict detected with IDs "

#: set while a wrapped ``check_conflict`` runs: the records the filter held back
_held: contextvars.ContextVar[list[logging.LogRecord] | None] = contextvars.ContextVar(
    "otel_taskctx_conflict_log", default=None
)


class ConflictLogFilter(logging.Filter):
    """Holds back powercrud's conflict line while a wrapped ``check_conflict`` runs."""

    def filter(self, record: logging.LogRecord) -> bool:
        held = _held.get()
        if held is None or not str(record.msg).startswith(CONFLICT_PREFIX):
            return True
        held.append(record)
        return False


_filter = ConflictLogFilter()


def install_filter() -> None:
    logger = logging.getLogger(POWERCRUD_LOGGER)
    if _filter not in logger.filters:
        logger.addFilter(_filter)


def remove_filter() -> None:
    logging.getLogger(POWERCRUD_LOGGER).removeFilter(_filter)


def capped_check_conflict(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """wrapt wrapper of ``AsyncManager.check_conflict``: same result, capped log line."""
    if not STATE.active:
        return wrapped(*args, **kwargs)
    held: list[logging.LogRecord] = []
    token = _held.set(held)
    try:
        conflicts = wrapped(*args, **kwargs)
    finally:
        _held.reset(token)
    if held:
        logging.getLogger(held[0].name).log(
            held[0].levelno, "%s%s", CONFLICT_PREFIX, format_ids(conflicts)
        )
    return conflicts
