"""``django.tasks``' worker side: ``task_started`` starts the run from the verified identity,
``task_finished`` ends it (see docs/django_tasks.md).
"""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry.context import Context
from opentelemetry.instrumentation.taskctx import barrier, runs, tasks_carriers
from opentelemetry.instrumentation.taskctx.tasks_producer import (
    CARRIER_KWARG,
    FAN_OUT_FIELD,
    attributes_of,
)
from opentelemetry.instrumentation.taskctx.tracing import STATE

from otel_taskctx import semconv
from otel_taskctx.conflicts import release_locks
from otel_taskctx.conflicts.base import reserved_here
from otel_taskctx.context import context_with_identity, context_without_identity
from otel_taskctx.descendants import resolve_manager
from otel_taskctx.identity import TaskIdentity
from otel_taskctx.propagation import extract, extract_bound, inject
from otel_taskctx.task_manager import TASK_MANAGER_PATH

log = logging.getLogger("otel_taskctx.instrumentation")


def _fan_out_name(carrier: Any, stored_name: str, identity: TaskIdentity | None) -> str:
    """The barrier record of a fanned-out child ("" for none): named by the carrier the
    library stored, and carrying the key of the job the identity names."""
    name = carrier.get(FAN_OUT_FIELD) if isinstance(carrier, dict) else None
    if identity is None or not isinstance(name, str) or (stored_name and name != stored_name):
        return ""
    job = barrier.job_of_name(name)
    return name if job in (None, identity.task_key) else ""


def _identity_of(task_result: Any) -> tuple[Context, TaskIdentity | None, str, bool]:
    """``(context, identity, fan-out name, carrier row read)`` of a starting task.

    A root task's identity is derived from its own result id (key ``task-<id>``): nothing
    that travels can change it. A fanned-out child's comes from its carrier, and counts only
    if it verifies, was issued for this very task and names the child's barrier record.
    """
    result_id = str(task_result.id)
    if CARRIER_KWARG in task_result.kwargs:
        log.warning(
            "task %s (%s) has a %s argument: a task identity is never taken from a task's "
            "arguments, so it grants nothing (passed to the function as it is)",
            result_id,
            task_result.task.module_path,
            CARRIER_KWARG,
        )
    carrier, stored_name, stored = tasks_carriers.take(task_result) or (None, "", False)
    if carrier is not None and not isinstance(carrier, dict):
        log.warning(
            "task %s (%s) has a malformed task carrier (%s): it runs as a plain task, without "
            "locks or nesting",
            result_id,
            task_result.task.module_path,
            type(carrier).__name__,
        )
        return Context(), None, "", stored
    if carrier is None or not (stored_name or carrier.get(FAN_OUT_FIELD)):  # a root task
        if carrier:
            ctx = extract(carrier)
        elif tasks_carriers.is_database_backend(task_result.task.get_backend()):
            ctx = Context()
        else:  # an in-process run (ImmediateBackend): the enqueue's trace context, as sent
            inject(sent := {}, context_without_identity())
            ctx = extract(sent)
        if runs.carries_identity(carrier):
            log.warning(
                "task %s (%s): its carrier holds a task identity, which a root task never "
                "gets; ignored (the task runs under its own key)",
                result_id,
                task_result.task.module_path,
            )
        identity = TaskIdentity(f"task-{result_id}", TASK_MANAGER_PATH, bound_to=result_id)
        return context_with_identity(identity, ctx=ctx), identity, "", stored
    ctx, identity, refusal = extract_bound(carrier, result_id)
    if identity is None and not refusal and runs.carries_identity(carrier):
        refusal = "its identity is malformed or oversized"  # the carrier's reader dropped it
    fan_out = _fan_out_name(carrier, stored_name, identity)
    if identity is not None and not fan_out:
        refusal = "its carrier names another task's barrier record"
    if refusal:
        log.warning(
            "ignoring the task identity of task %s (%s): %s; it runs as a plain task, without "
            "locks or nesting",
            task_result.id,
            task_result.task.module_path,
            refusal,
        )
        return context_without_identity(ctx), None, "", stored
    return ctx, identity, fan_out, stored


def on_task_started(sender: Any = None, task_result: Any = None, **kwargs: Any) -> None:
    if not STATE.active or task_result is None:
        return
    stored, fan_out, attributes = False, "", None
    try:
        ctx, identity, fan_out, stored = _identity_of(task_result)
        attributes = attributes_of(task_result.task, "process")
        attributes[semconv.MESSAGING_MESSAGE_ID] = str(task_result.id)
    except Exception:
        log.exception("could not start the consumer span of task %s", task_result.id)
        ctx, identity = Context(), None
    # a db_worker's run (not one in the enqueuing process) keeps the job's locks alive
    worker = tasks_carriers.is_database_backend(task_result.task.get_backend())
    label = task_result.task.module_path
    run = runs.begin(str(task_result.id), label, attributes, ctx, identity, bool(fan_out), worker)
    run.fan_out, run.stored = fan_out, stored


def hold_result(sender: Any = None, instance: Any = None, **kwargs: Any) -> None:
    """``pre_save`` of django_tasks_db's ``DBTaskResult``: a job whose function ended while
    fanned-out children of it are pending stays ``RUNNING`` until the last has ended."""
    run = runs.RUNS.get(str(getattr(instance, "id", "")))
    if run is None or run.identity is None or run.fan_out:
        return
    if run.identity.task_key not in barrier.launched:
        run.checked = True  # no child of it was launched: nothing to ask the barrier
        return
    from django.tasks.base import TaskResultStatus

    if instance.status not in (TaskResultStatus.SUCCESSFUL, TaskResultStatus.FAILED):
        return
    try:
        run.checked = True
        if not barrier.has_children(run.identity.task_key):
            return
    except Exception:
        run.checked = False
        log.warning("could not check the fan-out children of %s", instance.id, exc_info=True)
        return
    if instance.status == TaskResultStatus.FAILED:
        run.held_failure = (instance.exception_class_path, instance.traceback)
    instance.status = TaskResultStatus.RUNNING
    instance.finished_at = None
    run.held = True


def _failure_of(run: runs.Run, task_result: Any) -> tuple[str, str]:
    """``(exception class path, traceback)`` of a failed task (else empty)."""
    from django.tasks.base import TaskResultStatus

    if run.held_failure is not None:  # its status is held RUNNING: the failure is here
        return run.held_failure
    if task_result.status != TaskResultStatus.FAILED:
        return "", ""
    error = task_result.errors[-1] if task_result.errors else None
    if error is None:
        return "task failed", ""
    return error.exception_class_path, str(error.traceback or "")


def _last_line(error_type: str, traceback: str) -> str:
    lines = [line for line in traceback.strip().splitlines() if line.strip()]
    return lines[-1] if lines else error_type


def on_task_finished(sender: Any = None, task_result: Any = None, **kwargs: Any) -> None:
    if task_result is None:
        return
    run = runs.RUNS.pop(str(task_result.id), None)
    if run is None:
        return
    try:
        error_type, traceback = _failure_of(run, task_result)
        if error_type:
            runs.fail(run.span, error_type, error_type, traceback)
        run.finish()  # the last progress written, the lock refresher stopped
        if run.identity is not None:
            _end(run, task_result, _last_line(error_type, traceback) if error_type else "")
        if run.stored:
            try:
                tasks_carriers.drop(str(task_result.id))
            except Exception:
                log.debug("could not drop the carrier of task %s", task_result.id, exc_info=True)
    finally:
        run.close()


def _end(run: runs.Run, task_result: Any, error: str) -> None:
    """A child reports to its job's barrier; a job with pending children waits for them (the
    barrier completes it); any other job releases its locks now."""
    identity = run.identity
    path = task_result.task.module_path
    launched = identity.task_key in barrier.launched
    barrier.launched.discard(identity.task_key)
    if run.fan_out:
        try:
            barrier.child_ended(run.fan_out, error, path)
        except Exception:
            log.warning("could not record the end of fan-out child %s", run.fan_out, exc_info=True)
        return
    deferred = run.held or (not run.checked and launched)
    if deferred and barrier.job_ended(identity.task_key, path, str(task_result.id), error):
        log.info(
            "task id=%s path=%s returned: it stays RUNNING until its fanned-out children end",
            task_result.id,
            path,
        )
    elif run.held or identity.task_key in reserved_here:
        reserved_here.discard(identity.task_key)
        try:
            release_locks(identity.task_key, resolve_manager(identity))
        except Exception:
            log.warning("could not release the locks of task %s", identity.task_key, exc_info=True)
