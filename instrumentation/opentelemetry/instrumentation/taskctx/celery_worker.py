"""Celery's worker side: ``task_prerun`` verifies the ``otel_taskctx`` header and starts the
run, ``task_postrun`` ends it; ``task_failure`` / ``task_revoked`` in a worker's main process
end the jobs of tasks lost with their pool process (see docs/celery.md).
"""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.taskctx import barrier, celery_jobs, runs
from opentelemetry.instrumentation.taskctx.celery_producer import (
    FAN_OUT_FIELD,
    HEADER,
    MESSAGING_SYSTEM_VALUE,
    always_eager,
    job_key,
    root_identity,
    their_span,
    theirs_active,
)
from opentelemetry.instrumentation.taskctx.tracing import STATE, messaging_attributes

from otel_taskctx import semconv
from otel_taskctx.context import (
    context_with_identity,
    context_without_identity,
    current_task,
    nested_async_allowed,
)
from otel_taskctx.identity import TaskIdentity
from otel_taskctx.propagation import extract_bound

log = logging.getLogger("otel_taskctx.instrumentation")


def _header(request: Any) -> Any:
    getter = getattr(request, "get", None)
    return getter(HEADER) if callable(getter) else getattr(request, HEADER, None)


def identity_of(task: Any, task_id: str, request: Any) -> tuple[Context, TaskIdentity | None, str]:
    """``(context, identity, fan-out name)`` of a task about to run, from its header.

    The identity counts only if it verifies and was issued for this very task id; a root
    job's names the job of that id, a fanned-out child's names its barrier record. A message
    without the header runs as a plain task; a bad header too, with a warning.
    """
    carrier = _header(request)
    if carrier is None:
        return Context(), None, ""
    if not isinstance(carrier, dict):
        log.warning(
            "Celery task %s (%s) has a malformed %s header (%s): it runs as a plain task, "
            "without locks or nesting",
            task_id,
            task.name,
            HEADER,
            type(carrier).__name__,
        )
        return Context(), None, ""
    ctx, identity, refusal = extract_bound(carrier, task_id)
    if identity is None and not refusal and runs.carries_identity(carrier):
        refusal = "its identity is malformed or oversized"
    fan_out = ""
    if identity is not None:
        name = carrier.get(FAN_OUT_FIELD)
        if identity.depth == 0 and (name or identity.task_key != job_key(task_id)):
            refusal = "it names another job"
        elif identity.depth > 0 and not (
            isinstance(name, str) and barrier.job_of_name(name) in (None, identity.task_key)
        ):
            refusal = "its header names another task's barrier record"
        elif identity.depth > 0:
            fan_out = name
    if refusal:
        log.warning(
            "ignoring the task identity of Celery task %s (%s): %s; it runs as a plain task, "
            "without locks or nesting",
            task_id,
            task.name,
            refusal,
        )
        return context_without_identity(ctx), None, ""
    return ctx, identity, fan_out


def _attributes(task: Any, task_id: str, request: Any) -> dict[str, Any]:
    attributes = messaging_attributes(MESSAGING_SYSTEM_VALUE, "process", task.name)
    attributes[semconv.MESSAGING_MESSAGE_ID] = task_id
    delivery = getattr(request, "delivery_info", None) or {}
    destination = delivery.get("routing_key") if isinstance(delivery, dict) else None
    attributes[semconv.MESSAGING_DESTINATION_NAME] = str(destination or "")
    hostname = getattr(request, "hostname", None)
    if hostname:
        attributes[semconv.CELERY_HOSTNAME] = attributes[semconv.WORKER] = str(hostname)
    return attributes


def on_task_prerun(sender: Any = None, task_id: Any = None, task: Any = None, **kw: Any) -> None:
    if not STATE.active or task is None or not isinstance(task_id, str):
        return
    request = task.request
    if getattr(request, "is_eager", False):
        _eager_prerun(task, task_id)
        return
    try:
        ctx, identity, fan_out = identity_of(task, task_id, request)
        attributes: dict[str, Any] | None = _attributes(task, task_id, request)
    except Exception:
        log.exception("could not start the run of Celery task %s", task_id)
        ctx, identity, fan_out, attributes = Context(), None, "", None
    span = their_span(task, task_id)
    if span is None and theirs_active():  # theirs starts after ours: lineage at the end
        span = trace.INVALID_SPAN
    run = runs.begin(task_id, task.name, attributes, ctx, identity, bool(fan_out), True, span)
    run.fan_out = fan_out


def _eager_prerun(task: Any, task_id: str) -> None:
    """``task_always_eager`` or ``Task.apply``: a run in the caller. Inside a job it is part
    of the job (inline); outside one, or under ``allow_nested_async()``, a launch under
    ``task_always_eager`` is a job of its own, and an explicit ``Task.apply()`` a plain run
    (Celery's "run it here": its nested launches are published as Celery would)."""
    if current_task() is not None and not nested_async_allowed():
        return
    if not always_eager(task):
        return
    identity = root_identity(task_id)
    span = trace.get_current_span()
    ctx = context_with_identity(identity, ctx=trace.set_span_in_context(span, Context()))
    attributes = _attributes(task, task_id, task.request)
    runs.begin(task_id, task.name, attributes, ctx, identity, False, False)


def on_task_failure(
    sender: Any = None, task_id: Any = None, exception: Any = None, **kwargs: Any
) -> None:
    run = runs.RUNS.get(task_id) if isinstance(task_id, str) else None
    if run is not None:
        run.detach()
        run.exception = exception
        if run.own_span and exception is not None:
            runs.record_error(run.span, exception)
        return
    if not STATE.active or sender is None or getattr(sender.request, "is_eager", False):
        return
    from celery.exceptions import Terminated, TimeLimitExceeded, WorkerLostError

    if isinstance(exception, WorkerLostError | Terminated | TimeLimitExceeded):
        _lost(sender, str(task_id), sender.request, f"{type(exception).__name__}: {exception}")


def on_task_left(sender: Any = None, request: Any = None, **kwargs: Any) -> None:
    """``task_success`` / ``task_retry`` (sent before ``task_postrun``): leave the run's
    context now. opentelemetry-instrumentation-celery enters its context before ours
    (``task_prerun`` receivers are kept in that order) and leaves it at ``task_postrun``: ours
    must be left first, whichever of the two ``task_postrun`` receivers runs first."""
    request = request if request is not None else getattr(sender, "request", None)
    run = runs.RUNS.get(getattr(request, "id", None))
    if run is not None:
        run.detach()


def on_task_revoked(sender: Any = None, request: Any = None, **kwargs: Any) -> None:
    """``task_revoked`` (a worker's main process): a revoked job ends, a revoked child
    reports to its job's barrier."""
    if not STATE.active or request is None or sender is None:
        return
    task_id = str(getattr(request, "id", "") or "")
    run = runs.RUNS.pop(task_id, None)
    if run is not None:  # it ran in this very process (a solo or threads pool)
        run.finish()
        run.close()
    _lost(sender, task_id, request, "the task was revoked")


def on_worker_ready(sender: Any = None, **kwargs: Any) -> None:
    """``worker_ready`` (a worker's main process): fanned-out children still pending (their
    worker may have died whole) are swept from here after ``FAN_OUT_TIMEOUT``."""
    if not STATE.active:
        return
    try:
        if barrier.store().any_pending():
            barrier.ensure_sweeper()
    except Exception:
        log.warning("could not look for pending fan-out children", exc_info=True)


def _lost(task: Any, task_id: str, request: Any, error: str) -> None:
    try:
        _, identity, fan_out = identity_of(task, task_id, request)
        if identity is not None:
            celery_jobs.end(identity, fan_out, task, task_id, error, None, None, lost=True)
    except Exception:
        log.warning("could not end the job of lost Celery task %s", task_id, exc_info=True)


def on_task_postrun(
    sender: Any = None, task_id: Any = None, task: Any = None, state: Any = None, **kw: Any
) -> None:
    run = runs.RUNS.pop(task_id, None) if isinstance(task_id, str) else None
    if run is None:
        return
    try:
        if not run.own_span and not run.span.get_span_context().is_valid:
            theirs = their_span(task, task_id)  # started after ours: it is still open
            if theirs is not None and theirs.is_recording() and run.identity is not None:
                theirs.set_attributes(run.identity.lineage_attributes())
        exception = run.exception
        error = f"{type(exception).__name__}: {exception}" if exception is not None else ""
        if not error and state not in (None, "SUCCESS", "RETRY", "IGNORED"):
            error = f"the task ended in state {state}"
        run.finish()
        if run.identity is not None:
            retval = kw.get("retval")
            celery_jobs.end(run.identity, run.fan_out, task, task_id, error, retval, exception)
    except Exception:
        log.exception("could not end the run of Celery task %s", task_id)
    finally:
        run.close()
