"""Shared state and small helpers of the task-context instrumentation."""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import context, trace
from opentelemetry.trace import Status, StatusCode

from otel_taskctx import semconv
from otel_taskctx.policy import func_path, resolve_callable  # noqa: F401  (re-exported)

log = logging.getLogger("otel_taskctx.instrumentation")

#: Private key of the django-q2 task package that carries ``traceparent``/``tracestate``/
#: ``baggage`` from the producer to the worker (never the function's kwargs).
CARRIER_KEY = "_otel_taskctx"
#: Private key of the package of a fanned-out child job: the task key of the job it belongs to
FAN_OUT_KEY = "_otel_taskctx_fan_out"

#: django-q2 options that ``async_task`` pops from its kwargs (they never reach the function).
Q_OPTION_KEYS = (
    "hook",
    "group",
    "save",
    "sync",
    "cached",
    "ack_failure",
    "iter_count",
    "iter_cached",
    "chain",
    "broker",
    "cluster",
    "timeout",
    "task_name",
    "q_options",
)
#: ``AsyncManager.launch_async_task`` keywords that are not the function's kwargs.
LAUNCH_OPTION_KEYS = (
    "conflict_ids",
    "user",
    "affected_objects",
    "task_key",
    "group",
    "timeout",
    "sync",
    "cached",
    "broker",
    "q_options",
    "save",
)
#: powercrud workers that report failure by returning False.
POWERCRUD_BULK_TASKS = frozenset(
    {"powercrud.tasks.bulk_update_task", "powercrud.tasks.bulk_delete_task"}
)

FLUSH_TIMEOUT_MILLIS = 5000


class _State:
    """What ``instrument()`` configured; read by the wrappers and signal receivers."""

    def __init__(self) -> None:
        self.active = False
        self.tracer: trace.Tracer = trace.get_tracer(__name__)
        self.tracer_provider: Any = None


STATE = _State()


# --------------------------------------------------------------------------- functions


def short_name(path: str) -> str:
    return path.rsplit(".", 1)[-1] or path


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def is_uuid_text(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        uuid.UUID(value)
    except (TypeError, ValueError):
        return False
    return True


# --------------------------------------------------------------------------- nested ids


class _NestedCounters:
    """Per-task counters numbering the nested steps of a run (bounded)."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self.data: OrderedDict[str, int] = OrderedDict()
        self.lock = threading.Lock()

    def next(self, task_key: str) -> int:
        with self.lock:
            n = self.data.pop(task_key, 0) + 1
            self.data[task_key] = n
            while len(self.data) > self.size:
                self.data.popitem(last=False)
            return n

    def forget(self, task_key: str) -> None:
        with self.lock:
            self.data.pop(task_key, None)


nested_counters = _NestedCounters()


def nested_id(task_key: str, label: str) -> str:
    """A non-empty id naming the parent and the nested step: ``<parent>/nested/<n>-<func>``."""
    return f"{task_key}/nested/{nested_counters.next(task_key)}-{short_name(label)}"


# --------------------------------------------------------------------------- outcomes


def describe_failure(result: object) -> tuple[str, str]:
    """``(message, error type)`` from django-q2's failed result ``"<error> : <traceback>"``."""
    text = str(result) if result is not None else "task failed"
    message, _, tb = text.partition(" : Traceback")
    error_type = "Exception"
    lines = [line.strip() for line in tb.strip().splitlines() if line.strip()]
    if lines:
        head = lines[-1].split(":", 1)[0].strip()
        if head and " " not in head:
            error_type = head.rsplit(".", 1)[-1]
    if error_type == "Exception" and "exceeded maximum timeout" in message:
        error_type = "TimeoutException"
    return message.strip()[:1000] or "task failed", error_type


# --------------------------------------------------------------------------- flushing


def tracer_provider() -> Any:
    return STATE.tracer_provider or trace.get_tracer_provider()


def flush_spans(timeout_millis: int = FLUSH_TIMEOUT_MILLIS) -> bool:
    """Export what the SDK provider still holds; never raises."""
    provider = tracer_provider()
    flush = getattr(provider, "force_flush", None)
    if flush is None:
        return True
    try:
        return bool(flush(timeout_millis))
    except Exception as exc:  # a broken exporter must not break the worker
        log.warning("could not flush spans: %s", exc)
        return False


class _ExitFlush:
    """Flush pending spans when a multiprocessing child (a django-q2 worker) exits.

    Child processes end with ``os._exit``, so ``atexit`` hooks (the SDK's own shutdown) never
    run there; multiprocessing finalizers do.
    """

    def __init__(self) -> None:
        self.pid: int | None = None
        self.lock = threading.Lock()

    def register(self) -> None:
        pid = os.getpid()
        if self.pid == pid:
            return
        with self.lock:
            if self.pid == pid:
                return
            from multiprocessing import util

            util.Finalize(None, self._at_exit, exitpriority=50)
            self.pid = pid

    @staticmethod
    def _at_exit() -> None:
        if STATE.active:
            flush_spans()


exit_flush = _ExitFlush()


@contextmanager
def running_in(span: Any, ctx: Any) -> Iterator[Any]:
    """Attach ``ctx`` (which holds ``span``) for the block; on an exception mark the span
    failed; then detach and end the span."""
    token = context.attach(ctx)
    try:
        yield span
    except BaseException as exc:
        record_error(span, exc)
        raise
    finally:
        context.detach(token)
        span.end()


def record_error(span: Any, exc: BaseException) -> None:
    """Mark ``span`` failed with ``exc`` (exception event, status, ``error.type``)."""
    if span.is_recording():
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:1000]))
        span.set_attribute(semconv.ERROR_TYPE, type(exc).__qualname__)
