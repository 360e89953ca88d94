"""django-q2's worker side: ``pre_execute`` starts the run from the verified carrier (and
powercrud's ``task_context``), ``post_execute_in_worker`` ends it; powercrud's lock release.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

from opentelemetry import baggage
from opentelemetry.context import Context
from opentelemetry.instrumentation.taskctx import fan_out, runs
from opentelemetry.instrumentation.taskctx.producer import CARRIER_KEY, FAN_OUT_KEY
from opentelemetry.instrumentation.taskctx.runs import record_error
from opentelemetry.instrumentation.taskctx.tracing import STATE, flush_spans, messaging_attributes
from opentelemetry.trace import Status, StatusCode

from otel_taskctx import semconv
from otel_taskctx.context import (
    context_with_identity,
    context_without_identity,
    identity_from_context,
)
from otel_taskctx.identity import BAGGAGE_ENTRY, InvalidIdentity, TaskIdentity, verify
from otel_taskctx.policy import func_path
from otel_taskctx.propagation import extract

log = logging.getLogger("otel_taskctx.instrumentation")


#: powercrud workers that report failure by returning False
POWERCRUD_BULK_TASKS = frozenset(
    {"powercrud.tasks.bulk_update_task", "powercrud.tasks.bulk_delete_task"}
)


def _attributes(task: dict[str, Any], label: str) -> dict[str, Any]:
    attrs = messaging_attributes(semconv.MESSAGING_SYSTEM_VALUE, "process", label)
    attrs[semconv.MESSAGING_MESSAGE_ID] = str(task.get("id"))
    attrs[semconv.TASK_NAME] = str(task.get("name"))
    cluster = task.get("cluster")
    if cluster:
        attrs[semconv.MESSAGING_DESTINATION_NAME] = str(cluster)
    if task.get("group"):
        attrs[semconv.TASK_GROUP] = str(task["group"])
    if task.get("sync"):
        attrs[semconv.TASK_SYNC] = True
    return attrs


def _enter_powercrud_context(identity: TaskIdentity) -> Any:
    """Enter powercrud's own ``task_context`` (its real module where ``compat`` stands in)."""
    try:
        module = importlib.import_module("powercrud.async_context")
    except Exception:
        return None
    if getattr(module, "__name__", None) != "powercrud.async_context":
        powercrud_module = getattr(module, "powercrud_module", None)
        module = powercrud_module() if callable(powercrud_module) else None
    if module is None:
        return None
    cm = module.task_context(identity.task_key, identity.manager_class_path)
    cm.__enter__()
    return cm


def _renewed_identity(carrier: object, task_name: str) -> TaskIdentity | None:
    """An authentic, expired token naming this very task (it waited in the queue), renewed."""
    if not isinstance(carrier, dict) or not isinstance(carrier.get("baggage"), str):
        return None
    from opentelemetry.baggage.propagation import W3CBaggagePropagator

    try:
        raw = W3CBaggagePropagator().extract({"baggage": carrier["baggage"]}, Context())
        token = baggage.get_baggage(BAGGAGE_ENTRY, raw)
        if token is None:
            return None
        old = verify(token, now=0)  # signature and shape, not the expiry
    except (InvalidIdentity, ValueError, TypeError):
        return None
    if old.task_key != task_name:
        return None
    log.info("task %s waited longer than its identity's TTL: identity renewed", task_name)
    return TaskIdentity(
        old.task_key, old.manager_class_path, old.root_task_key, old.depth, old.parent_task_key
    )


def _identity_of(task: dict[str, Any]) -> tuple[Context, TaskIdentity | None, bool]:
    """``(context, identity, fanned out)`` of a starting job, from its carrier."""
    carrier = task.get(CARRIER_KEY)
    ctx = extract(carrier) if carrier is not None else Context()
    identity = identity_from_context(ctx)
    if identity is None and carrier is not None:
        identity = _renewed_identity(carrier, str(task.get("name")))
        if identity is not None:
            ctx = context_with_identity(identity, ctx=ctx)
        elif runs.carries_identity(carrier):
            # our producer wrote it inside django-q2's signed package: an identity that
            # no longer verifies (truncated, other key) is an anomaly, not just noise
            log.warning(
                "task %s carried a task identity that does not verify (damaged, or "
                "signed with another key): it runs as a plain job, without locks "
                "or nesting",
                task.get("name"),
            )
    fanned_out = identity is not None and task.get(FAN_OUT_KEY) == identity.task_key
    if identity is not None and not fanned_out and identity.task_key != str(task.get("name")):
        log.warning(
            "ignoring the identity of task %s: it names task %s",
            task.get("name"),
            identity.task_key,
        )
        ctx = context_without_identity(ctx)
        identity = None
    return ctx, identity, fanned_out


def on_pre_execute(
    sender: Any = None, func: Any = None, task: dict[str, Any] | None = None, **kwargs: Any
) -> None:
    if not STATE.active or not isinstance(task, dict):
        return
    label = func_path(task.get("func") if task.get("func") is not None else func)
    try:
        ctx, identity, fanned_out = _identity_of(task)
        attributes = _attributes(task, label)
    except Exception:
        log.exception("could not start the consumer span of task %s", task.get("name"))
        ctx, identity, fanned_out, attributes = Context(), None, False, None
    run = runs.begin(id(task), label, attributes, ctx, identity, fanned_out, not task.get("sync"))
    if identity is not None:
        try:
            run.powercrud_cm = _enter_powercrud_context(identity)
        except Exception:
            log.exception("could not enter powercrud's task context")


def _powercrud_reported_errors(run: runs.Run, task: dict[str, Any]) -> str:
    """What powercrud's bulk worker reported (its last progress message)."""
    try:
        from powercrud.async_manager import AsyncManager

        kwargs = task.get("kwargs") if isinstance(task.get("kwargs"), dict) else {}
        key = run.identity.task_key if run.identity else kwargs.get("task_key") or task.get("name")
        manager = AsyncManager.resolve_manager(
            run.identity.manager_class_path if run.identity else kwargs.get("manager_class")
        )
        progress = manager.get_progress(str(key))
    except Exception as exc:
        return f"powercrud reported a failure (progress unavailable: {exc})"
    return str(progress) if progress else "powercrud reported a failure"


def _record_outcome(run: runs.Run, func: Any, task: dict[str, Any]) -> bool:
    """Set the span status from the run's outcome; True when the run timed out."""
    span = run.span
    success = task.get("success")
    if success is None:  # sync mode: django-q2 re-raises after this signal
        exc = sys.exc_info()[1]
        if span.is_recording():
            if exc is not None:
                record_error(span, exc)
            else:
                span.set_status(Status(StatusCode.ERROR, "task failed"))
        return exc is not None and type(exc).__name__ == "TimeoutException"
    if not success:
        message, error_type = _describe_failure(task.get("result"))
        runs.fail(span, error_type, message, str(task.get("result"))[:8000])
        return error_type == "TimeoutException"
    label = func_path(task.get("func") if task.get("func") is not None else func)
    if label in POWERCRUD_BULK_TASKS and task.get("result") is False:
        errors = _powercrud_reported_errors(run, task)
        runs.fail(span, "powercrud_reported_failure", errors)
        span.set_attribute(semconv.REPORTED_ERRORS, errors[:4000])
    return False


def on_post_execute(
    sender: Any = None, func: Any = None, task: dict[str, Any] | None = None, **kwargs: Any
) -> None:
    if not isinstance(task, dict):
        return
    run = runs.RUNS.pop(id(task), None)
    if run is None:
        return
    timed_out = False
    fan_out.defer_completion(task, run.identity)
    run.finish()  # powercrud's failure report reads the last progress
    try:
        timed_out = _record_outcome(run, func, task)
    except Exception:
        log.exception("could not record the outcome of task %s", task.get("name"))
    finally:
        run.close()
    if timed_out:  # the sentinel terminates a timed-out worker right after this signal
        flush_spans(2000)


def _describe_failure(result: object) -> tuple[str, str]:
    """``(message, error type)`` of django-q2's failed result ``"<error> : <traceback>"``."""
    text = str(result) if result is not None else "task failed"
    message, _, tb = text.partition(" : Traceback")
    error_type = "Exception"
    lines = [line.strip() for line in tb.strip().splitlines() if line.strip()]
    head = lines[-1].split(":", 1)[0].strip() if lines else ""
    if head and " " not in head:
        error_type = head.rsplit(".", 1)[-1]
    if error_type == "Exception" and "exceeded maximum timeout" in message:
        error_type = "TimeoutException"
    return message.strip()[:1000] or "task failed", error_type


def release_through_store(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """wrapt wrapper of ``AsyncManager.remove_conflict_ids``: one batched release through the
    conflict store; powercrud's own loop if it is unreachable or steps aside."""
    from otel_taskctx.powercrud_cache import steps_aside

    if not STATE.active or steps_aside(instance):
        return wrapped(*args, **kwargs)
    task_name = args[0] if args else kwargs.get("task_name")
    try:
        from otel_taskctx.conflicts import get_conflict_store

        get_conflict_store(instance).release(str(task_name))
        return None
    except Exception as exc:
        log.warning(
            "could not release the locks of task %s in one batch (%s); "
            "using powercrud's per-key removal",
            task_name,
            exc,
        )
        return wrapped(*args, **kwargs)
