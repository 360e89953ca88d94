"""Runs of tasks, the same for both queues: the enqueue plan and PRODUCER span, the registry
of open runs with their CONSUMER span, and nested launches run inline.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry import context, trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.taskctx.tracing import STATE, messaging_attributes
from opentelemetry.trace import SpanKind, Status, StatusCode

from otel_taskctx import semconv
from otel_taskctx.context import context_with_identity
from otel_taskctx.descendants import register_for, resolve_manager
from otel_taskctx.identity import BAGGAGE_ENTRY, TaskIdentity
from otel_taskctx.policy import func_path, resolve_callable

log = logging.getLogger("otel_taskctx.instrumentation")


@contextmanager
def running_in(span: Any, ctx: Any) -> Iterator[Any]:
    """Attach ``ctx`` (which holds ``span``) for the block; an exception fails the span."""
    token = context.attach(ctx)
    try:
        yield span
    except BaseException as exc:
        record_error(span, exc)
        raise
    finally:
        context.detach(token)
        span.end()


#: the otel context entry of an instrumented enqueue in progress
PLAN_KEY = context.create_key("otel_taskctx.enqueue-plan")


@dataclass(slots=True, eq=False)
class Plan:
    """An instrumented enqueue in progress, for the queue's enqueue signal receiver."""

    span: trace.Span
    #: a fanned-out child's identity (and, ``django.tasks``, its barrier record)
    child: TaskIdentity | None = None
    fan_out: str = ""
    #: django-q2: the powercrud launch it is the job of; ``django.tasks``: the task sent
    launch: Any = None
    task: Any = None
    done: bool = False


def sending(plan: Plan) -> Any:
    """Run the enqueue under ``plan``'s PRODUCER span, ``plan`` in the context."""
    ctx = context.set_value(PLAN_KEY, plan, trace.set_span_in_context(plan.span))
    return running_in(plan.span, ctx)


def plan() -> Plan | None:
    return context.get_value(PLAN_KEY)


def record_error(span: Any, exc: BaseException) -> None:
    """Mark ``span`` failed with ``exc`` (exception event, status, ``error.type``)."""
    if span.is_recording():
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:1000]))
        span.set_attribute(semconv.ERROR_TYPE, type(exc).__qualname__)


def fail(span: Any, error_type: str, message: str, stacktrace: str = "") -> None:
    """Mark ``span`` failed with an error its queue reported (not one raised here)."""
    if span.is_recording():
        if stacktrace:
            event = {"exception.type": error_type, "exception.message": message}
            span.add_event("exception", {**event, "exception.stacktrace": stacktrace})
        span.set_status(Status(StatusCode.ERROR, message[:1000]))
        span.set_attribute(semconv.ERROR_TYPE, error_type)


@dataclass
class Run:
    span: trace.Span
    token: object
    identity: TaskIdentity | None
    #: a worker's run (one task at a time), not a sync or in-process one
    worker: bool = False
    lock_keeper: Any = None
    #: powercrud's own ``task_context``, entered for a django-q2 run
    powercrud_cm: Any = None
    #: (``django.tasks``) the barrier record of a fanned-out child, "" for a job
    fan_out: str = ""
    #: (``django.tasks``) the job's result was held RUNNING for pending children
    held: bool = False
    held_failure: tuple[str, str] | None = None
    #: (``django.tasks``) ``held`` was decided; a carrier row was read
    checked: bool = False
    stored: bool = False
    #: the CONSUMER span is ours to end (not another instrumentation's)
    own_span: bool = True
    #: (Celery) what the task raised, from ``task_failure`` for ``task_postrun``
    exception: BaseException | None = None

    def finish(self) -> None:
        """The run's work is over (before the queue reports the outcome): the last progress
        written, the lock refresher stopped."""
        if self.identity is None:
            return
        try:
            from otel_taskctx.progress import flush_progress

            flush_progress(self.identity.task_key)
        except Exception:
            log.exception("could not write the last progress of task %s", self.identity.task_key)
        if self.lock_keeper is not None:
            self.lock_keeper.stop()
            self.lock_keeper = None

    def detach(self) -> None:
        """Leave the run's context now (Celery: before another instrumentation leaves its
        own, which it entered first)."""
        token, self.token = self.token, None
        if token is not None:
            context.detach(token)

    def close(self) -> None:
        """Leave the run's contexts (powercrud's, then ours) and end its span."""
        try:
            if self.powercrud_cm is not None:
                self.powercrud_cm.__exit__(None, None, None)
            self.detach()
        except Exception:  # detached elsewhere (a run that never got its end signal)
            log.debug("could not leave the context of a run", exc_info=True)
        finally:
            if self.own_span:
                self.span.end()
            if self.identity is not None:
                with _counters_lock:
                    _counters.pop(self.identity.task_key, None)


#: the attributes of ours another instrumentation's CONSUMER span gets, besides the lineage
_ON_THEIR_SPAN = (semconv.NESTED_MODE, semconv.WORKER)

#: the runs in progress in this process, by the key the queue's two signals share
RUNS: dict[Hashable, Run] = {}


def begin(
    key: Hashable,
    label: str,
    attributes: dict[str, Any] | None,
    ctx: Context,
    identity: TaskIdentity | None,
    fan_out: bool,
    worker: bool,
    span: trace.Span | None = None,
) -> Run:
    """Start a run under its CONSUMER span (``attributes`` None: the carrier could not be read,
    the run is isolated from the process's context, unrecorded; ``span``: another
    instrumentation's, which gets the lineage and is not ended here); in a worker, refresh
    the job's locks. A worker's run still open never got its end signal: it is closed first."""
    own = span is None
    if attributes is None:
        ctx, identity, span = Context(), None, span or trace.INVALID_SPAN
    else:
        if identity is not None:
            attributes.update(identity.lineage_attributes())
        if fan_out:
            attributes[semconv.NESTED_MODE] = "fan_out"
            from opentelemetry.instrumentation.taskctx import barrier

            barrier.ensure_sweeper()
        if span is None:
            span = STATE.tracer.start_span(
                f"process {label}", context=ctx, kind=SpanKind.CONSUMER, attributes=attributes
            )
        elif span.is_recording():
            lineage = identity.lineage_attributes() if identity is not None else {}
            span.set_attributes(
                {**lineage, **{k: v for k, v in attributes.items() if k in _ON_THEIR_SPAN}}
            )
    if worker:
        for stale_key, stale in list(RUNS.items()):
            if stale.worker:
                del RUNS[stale_key]
                if stale.span.is_recording():
                    stale.span.set_status(Status(StatusCode.ERROR, "the worker never ended it"))
                stale.finish()
                stale.close()
    token = context.attach(trace.set_span_in_context(span, ctx))
    run = RUNS[key] = Run(span, token, identity, worker, own_span=own)
    if identity is not None and worker:
        try:
            run.lock_keeper = keep_locks_alive(identity)
        except Exception:
            log.exception("could not start refreshing the locks of %s", identity.task_key)
    return run


def send_span(system: str, label: str, attributes: dict[str, Any]) -> trace.Span:
    """The PRODUCER span of a task being sent."""
    attributes = {**messaging_attributes(system, "send", label), **attributes}
    return STATE.tracer.start_span(f"send {label}", kind=SpanKind.PRODUCER, attributes=attributes)


def carries_identity(carrier: object) -> bool:
    """Does ``carrier`` hold a task identity, readable or not?"""
    sent = carrier.get("baggage") if isinstance(carrier, dict) else None
    return sent is not None and (not isinstance(sent, str) or BAGGAGE_ENTRY in sent)


def keep_locks_alive(identity: TaskIdentity) -> Any:
    """Refresh the TTL of the job's locks while it runs; the keeper to stop, or None (a cache
    whose locks cannot be kept: :func:`otel_taskctx.powercrud_cache.steps_aside`)."""
    from otel_taskctx.conflicts.keepalive import start_keeping_locks_alive
    from otel_taskctx.powercrud_cache import steps_aside

    manager = resolve_manager(identity)
    if steps_aside(manager):
        return None
    return start_keeping_locks_alive(identity.task_key, manager)


# nested steps of a run are numbered per task (bounded)
_counters: OrderedDict[str, int] = OrderedDict()
_counters_lock = threading.Lock()


def nested_id(task_key: str, label: str) -> str:
    """A non-empty id naming the parent and the nested step: ``<parent>/nested/<n>-<func>``."""
    with _counters_lock:
        n = _counters.pop(task_key, 0) + 1
        _counters[task_key] = n
        while len(_counters) > 4096:
            _counters.popitem(last=False)
    return f"{task_key}/nested/{n}-{label.rsplit('.', 1)[-1] or label}"


def run_inline(
    identity: TaskIdentity,
    func: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    conflict_ids: Mapping[Any, Iterable[Hashable]] | None = None,
    label: str | None = None,
) -> str:
    """Run a nested launch now, under the job's key (depth + 1), in an INTERNAL span; its
    nested id. Its descendants are reserved first (a conflict raises before it runs)."""
    label = label or func_path(func)
    target = resolve_callable(func)
    step_id = nested_id(identity.task_key, label)
    child = identity.child(identity.task_key, identity.manager_class_path)
    ctx = context_with_identity(child)
    attributes: dict[str, Any] = dict(child.lineage_attributes())
    attributes[semconv.NESTED_ID] = step_id
    attributes[semconv.NESTED_MODE] = "inline"
    attributes[semconv.CODE_FUNCTION_NAME] = label
    span = STATE.tracer.start_span(
        label, context=ctx, kind=SpanKind.INTERNAL, attributes=attributes
    )
    with running_in(span, trace.set_span_in_context(span, ctx)):
        if conflict_ids:
            register_for(child, conflict_ids)
        target(*args, **kwargs)
    return step_id
