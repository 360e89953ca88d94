"""Django's task framework (``django.tasks``), the worker side (``manage.py db_worker``, the
``ImmediateBackend``, any backend that sends the framework's signals).

* ``task_started`` takes the task's carrier from beside the task (:mod:`.tasks_carriers`),
  accepts its identity only if it verifies **and was issued for this very task** (its result
  id; anything else runs as a plain task with a warning naming both ids: no lock is taken and
  none is released), starts the CONSUMER span and attaches both; the locks of the job are
  kept alive while the task runs (``LOCK_TTL`` / ``LOCK_REFRESH_INTERVAL``, as on django-q2).
* ``task_finished`` ends the span with the outcome and ends the task: its held progress is
  written, the lock refresher stops, its locks are released and its carrier is dropped.
* **Fan-out.** A fanned-out child's end is recorded in the barrier (:mod:`._barrier`); its
  locks belong to its job. A job with children is complete when the last of them has ended:
  only then are its locks released, and its result, held ``RUNNING`` until then
  (django_tasks_db's ``DBTaskResult``, through its ``pre_save``), becomes ``SUCCESSFUL`` or
  ``FAILED``: failed with its own error, or else with the first failed child's (exception
  class :class:`~otel_taskctx.errors.FanOutChildFailed`, the message in its traceback).
  Siblings of a failed child keep running. Only a job that launched children in this process
  asks the barrier anything.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.taskctx import _barrier, runs, sweeper, tasks_carriers, utils
from opentelemetry.instrumentation.taskctx._django_tasks import (
    CARRIER_KWARG,
    FAN_OUT_FIELD,
    attributes_of,
)
from opentelemetry.trace import SpanKind, Status, StatusCode

from otel_taskctx import semconv
from otel_taskctx.conflicts.base import reserved_here
from otel_taskctx.context import context_with_identity, context_without_identity
from otel_taskctx.identity import BAGGAGE_ENTRY, TaskIdentity
from otel_taskctx.propagation import extract, extract_bound
from otel_taskctx.task_manager import TASK_MANAGER_PATH

log = logging.getLogger("otel_taskctx.instrumentation")

#: ``exception_class_path`` of a job failed by one of its fanned-out children
CHILD_FAILED = "otel_taskctx.errors.FanOutChildFailed"


@dataclass
class _Run(runs.Run):
    #: the barrier record of a fanned-out child ("" for a job's own run)
    fan_out: str = ""
    #: the job's result was held RUNNING because children of it are pending
    held: bool = False
    #: the held result's failure, ``(exception class path, traceback)`` (its function raised)
    held_failure: tuple[str, str] | None = None
    #: ``held`` was decided (by the result's ``pre_save``)
    checked: bool = False
    #: a carrier row was read for the task (dropped after its end)
    stored: bool = False
    #: a ``db_worker``'s run (not one in the enqueuing process)
    worker: bool = False


#: runs in progress, by the task result's id
_runs: dict[str, _Run] = {}


def _fan_out_name(carrier: Any, stored_name: str, identity: TaskIdentity | None) -> str:
    """The barrier record of a fanned-out child ("" for none): named by the carrier the
    library stored, and carrying the key of the job the identity names."""
    name = carrier.get(FAN_OUT_FIELD) if isinstance(carrier, dict) else None
    if identity is None or not isinstance(name, str) or (stored_name and name != stored_name):
        return ""
    job = _barrier.job_of_name(name)
    return name if job in (None, identity.task_key) else ""


def _carries_identity(carrier: Any) -> bool:
    """Does ``carrier`` hold a task identity, readable or not?"""
    sent = carrier.get("baggage") if isinstance(carrier, dict) else None
    return sent is not None and (not isinstance(sent, str) or BAGGAGE_ENTRY in sent)


def _refused(task_result: Any, why: str) -> None:
    log.warning(
        "ignoring the task identity of task %s (%s): %s; it runs as a plain task, without "
        "locks or nesting",
        task_result.id,
        task_result.task.module_path,
        why,
    )


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
        ctx = extract(carrier) if carrier else Context()
        if _carries_identity(carrier):
            log.warning(
                "task %s (%s): its carrier holds a task identity, which a root task never "
                "gets; ignored (the task runs under its own key)",
                result_id,
                task_result.task.module_path,
            )
        identity = TaskIdentity(f"task-{result_id}", TASK_MANAGER_PATH, bound_to=result_id)
        return context_with_identity(identity, ctx=ctx), identity, "", stored
    ctx, identity, refusal = extract_bound(carrier, result_id)
    if identity is None and not refusal and _carries_identity(carrier):
        refusal = "its identity is malformed or oversized"  # the carrier's reader dropped it
    fan_out = _fan_out_name(carrier, stored_name, identity)
    if identity is not None and not fan_out:
        refusal = "its carrier names another task's barrier record"
    if refusal:
        _refused(task_result, refusal)
        return context_without_identity(ctx), None, "", stored
    return ctx, identity, fan_out, stored


def _stop_stale_runs() -> None:
    """A ``db_worker`` runs one task at a time: a worker's run still open here never got its
    ``task_finished`` (its result could not be saved): its lock refresher stops now."""
    for result_id, run in list(_runs.items()):
        if run.worker:
            _runs.pop(result_id, None)
            run.finish()
            run.close()


def on_task_started(sender: Any = None, task_result: Any = None, **kwargs: Any) -> None:
    if not utils.STATE.active or task_result is None:
        return
    stored, fan_out = False, ""
    worker = tasks_carriers.is_database_backend(task_result.task.get_backend())
    try:
        ctx, identity, fan_out, stored = _identity_of(task_result)
        attributes = attributes_of(task_result.task, "process")
        attributes[semconv.MESSAGING_MESSAGE_ID] = str(task_result.id)
        if identity is not None:
            attributes.update(identity.lineage_attributes())
        if fan_out:
            attributes[semconv.NESTED_MODE] = "fan_out"
            sweeper.ensure_running()
        span = utils.STATE.tracer.start_span(
            f"process {task_result.task.module_path}",
            context=ctx,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        )
    except Exception:
        log.exception("could not start the consumer span of task %s", task_result.id)
        ctx, identity, span = Context(), None, trace.INVALID_SPAN
    if worker:
        _stop_stale_runs()
    # a worker's run (not one in the enqueuing process) keeps the job's locks alive
    run = runs.start(
        _Run, span, ctx, identity, keep_locks=worker, fan_out=fan_out, stored=stored, worker=worker
    )
    _runs[str(task_result.id)] = run


def hold_result(sender: Any = None, instance: Any = None, **kwargs: Any) -> None:
    """``pre_save`` of django_tasks_db's ``DBTaskResult``: a job whose function ended while
    fanned-out children of it are pending stays ``RUNNING`` until the last has ended."""
    run = _runs.get(str(getattr(instance, "id", "")))
    if run is None or run.identity is None or run.fan_out:
        return
    if not _barrier.launched_here(run.identity.task_key):
        run.checked = True  # no child of it was launched: nothing to ask the barrier
        return
    from django.tasks.base import TaskResultStatus

    if instance.status not in (TaskResultStatus.SUCCESSFUL, TaskResultStatus.FAILED):
        return
    try:
        run.checked = True
        if not _barrier.has_children(run.identity.task_key):
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


def _failure_of(run: _Run, task_result: Any) -> tuple[str, str]:
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
    run = _runs.pop(str(task_result.id), None)
    if run is None:
        return
    try:
        error_type, traceback = _failure_of(run, task_result)
        if run.span.is_recording() and error_type:
            run.span.set_status(Status(StatusCode.ERROR, error_type))
            run.span.set_attribute(semconv.ERROR_TYPE, error_type)
            if traceback:
                run.span.add_event(
                    "exception",
                    {"exception.type": error_type, "exception.stacktrace": traceback},
                )
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


def _end(run: _Run, task_result: Any, error: str) -> None:
    """A task with an identity ended: a child reports to its job's barrier; a job with
    pending children waits for them; any other job completes now."""
    identity = run.identity
    path = task_result.task.module_path
    if run.fan_out:
        _barrier.forget_launched(identity.task_key)
        try:
            _barrier.child_ended(run.fan_out, error, path)
        except Exception:
            log.warning("could not record the end of fan-out child %s", run.fan_out, exc_info=True)
        return
    deferred = False
    if run.held or (not run.checked and _barrier.launched_here(identity.task_key)):
        try:
            deferred = _barrier.job_ended(identity.task_key, path, str(task_result.id), error)
        except Exception:  # the barrier table is unreachable: the task ends now
            log.warning("could not check the fan-out children of %s", path, exc_info=True)
    _barrier.forget_launched(identity.task_key)
    if deferred:
        sweeper.ensure_running()
        log.info(
            "task id=%s path=%s returned: it stays RUNNING until its fanned-out children end",
            task_result.id,
            path,
        )
    if not deferred and (run.held or identity.task_key in reserved_here):
        reserved_here.discard(identity.task_key)
        try:
            _release(identity.task_key, identity.manager_class_path)
        except Exception:
            log.warning("could not release the locks of task %s", identity.task_key, exc_info=True)


def _release(task_key: str, manager_class_path: str = TASK_MANAGER_PATH) -> None:
    from otel_taskctx.conflicts import get_conflict_store
    from otel_taskctx.descendants import resolve_manager

    manager = resolve_manager(TaskIdentity(task_key, manager_class_path))
    get_conflict_store(manager).release(task_key)


def complete(job_key: str, job: Any, failed: list[Any]) -> None:
    """The end of a ``django.tasks`` job whose last fanned-out child has ended: its locks are
    released and its held result gets its final status, through django-tasks-db's own
    ``set_successful`` / ``set_failed`` (the job's own failure, already recorded, only gets
    its status and end time back)."""
    try:
        _release(job_key)
    finally:
        _finish_result(job_key, job, failed)


def _finish_result(job_key: str, job: Any, failed: list[Any]) -> None:
    from django.apps import apps
    from django.tasks.base import TaskResultStatus
    from django.utils import timezone

    from otel_taskctx.errors import FanOutChildFailed

    if not apps.is_installed("django_tasks_db"):  # another backend: its own status stands
        return
    db_result = tasks_carriers.result_model().objects.filter(id=job.result_id).first()
    if db_result is None:
        log.warning("fan-out job %s has no task result %s", job_key, job.result_id)
        return
    message = ""
    if job.error:  # the job's own function failed: its error stays
        db_result.status = TaskResultStatus.FAILED
        db_result.finished_at = timezone.now()
        db_result.save(update_fields=["status", "finished_at"])
    elif failed:
        message = _barrier.failure_message(failed)
        db_result.set_failed(FanOutChildFailed(message))
    else:
        db_result.set_successful(db_result.return_value)
    log.log(
        logging.ERROR if db_result.status == TaskResultStatus.FAILED else logging.INFO,
        "Task id=%s path=%s state=%s (after its fanned-out children)%s",
        job.result_id,
        job.func,
        db_result.status,
        f": {CHILD_FAILED}: {message}" if message else "",
    )


_barrier.register_completion(_barrier.DJANGO_TASKS, complete)
