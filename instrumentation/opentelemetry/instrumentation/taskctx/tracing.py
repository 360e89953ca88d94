"""The instrumentation's tracer and the span helpers its wrappers and receivers share."""

from __future__ import annotations

import logging
import os
from typing import Any

from opentelemetry import trace

from otel_taskctx import semconv

log = logging.getLogger("otel_taskctx.instrumentation")


class _State:
    """What ``instrument()`` configured; read by the wrappers and signal receivers."""

    active = False
    tracer: trace.Tracer = trace.get_tracer(__name__)
    tracer_provider: Any = None


STATE = _State()


def messaging_attributes(system: str, operation: str, func: str) -> dict[str, Any]:
    return {
        semconv.MESSAGING_SYSTEM: system,
        semconv.MESSAGING_OPERATION_TYPE: operation,
        semconv.MESSAGING_OPERATION_NAME: operation,
        semconv.TASK_FUNC: func,
    }


def flush_spans(timeout_millis: int = 5000) -> bool:
    """Export what the SDK provider still holds; never raises."""
    provider = STATE.tracer_provider or trace.get_tracer_provider()
    flush = getattr(provider, "force_flush", None)
    try:
        return flush is None or bool(flush(timeout_millis))
    except Exception as exc:  # a broken exporter must not break the worker
        log.warning("could not flush spans: %s", exc)
        return False


_exit_flush_pid = 0


def flush_at_exit(sender: Any = None, **kwargs: Any) -> None:
    """django-q2's ``post_spawn``: flush this worker's spans when it exits. Workers end with
    ``os._exit`` (no ``atexit``); multiprocessing's finalizers still run."""
    global _exit_flush_pid
    if STATE.active and _exit_flush_pid != os.getpid():
        from multiprocessing import util

        util.Finalize(None, _at_exit, exitpriority=50)
        _exit_flush_pid = os.getpid()


def _at_exit() -> None:
    if STATE.active:
        flush_spans()
