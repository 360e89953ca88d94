"""Django's task framework (``django.tasks``), the worker side (``manage.py db_worker``, the
``ImmediateBackend``, any backend that sends the framework's signals).

* ``task_started`` takes the carrier out of the task's keyword arguments before the function
  is called, verifies the identity (one that does not verify is dropped with a warning),
  starts the CONSUMER span and attaches both. ``Task.call`` drops a carrier that no signal
  took (a backend that sends no ``task_started``), so the function never sees it.
* ``task_finished`` ends the span with the outcome and ends the task: its held progress is
  written and its locks are released.
* **Fan-out.** A fanned-out child's end is recorded in the barrier (:mod:`._barrier`); its
  locks belong to its job. A job with children is complete when the last of them has ended:
  only then are its locks released, and its result, held ``RUNNING`` until then
  (django_tasks_db's ``DBTaskResult``, through its ``pre_save``), becomes ``SUCCESSFUL`` or
  ``FAILED``: failed with its own error, or else with the first failed child's (exception
  class :class:`~otel_taskctx.errors.FanOutChildFailed`, the message in its traceback).
  Siblings of a failed child keep running.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from opentelemetry import context, trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.taskctx import _barrier, utils
from opentelemetry.instrumentation.taskctx._consumer import carries_identity
from opentelemetry.instrumentation.taskctx._django_tasks import (
    CARRIER_KWARG,
    FAN_OUT_FIELD,
    attributes_of,
)
from opentelemetry.trace import SpanKind, Status, StatusCode

from otel_taskctx import semconv
from otel_taskctx.context import identity_from_context
from otel_taskctx.identity import TaskIdentity
from otel_taskctx.propagation import extract
from otel_taskctx.task_manager import TASK_MANAGER_PATH

log = logging.getLogger("otel_taskctx.instrumentation")

#: ``exception_class_path`` of a job failed by one of its fanned-out children
CHILD_FAILED = "otel_taskctx.errors.FanOutChildFailed"


@dataclass
class _Run:
    span: trace.Span
    token: object
    identity: TaskIdentity | None
    #: the barrier row of a fanned-out child ("" for a job's own run)
    fan_out: str = ""
    #: the job's result was held RUNNING because children of it are pending
    held: bool = False
    #: the held result's failure, ``(exception class path, traceback)`` (its function raised)
    held_failure: tuple[str, str] | None = None
    #: ``held`` was decided (by the result's ``pre_save``)
    checked: bool = False


#: runs in progress, by the task result's id
_runs: dict[str, _Run] = {}


def _fan_out_name(carrier: Any, identity: TaskIdentity | None) -> str:
    """The barrier row a verified identity's carrier names ("" for none)."""
    name = carrier.get(FAN_OUT_FIELD) if isinstance(carrier, dict) else None
    if identity is None or not isinstance(name, str):
        return ""
    job = _barrier.job_of_name(name)
    return name if job in (None, identity.task_key) else ""


def on_task_started(sender: Any = None, task_result: Any = None, **kwargs: Any) -> None:
    if not utils.STATE.active or task_result is None:
        return
    carrier = task_result.kwargs.pop(CARRIER_KWARG, None)
    fan_out = ""
    try:
        ctx = extract(carrier) if isinstance(carrier, dict) else Context()
        identity = identity_from_context(ctx)
        if identity is None and carries_identity(carrier):
            log.warning(
                "task %s (%s) carried a task identity that does not verify (forged, damaged, "
                "or signed with another key): it runs as a plain task, without locks or "
                "nesting",
                task_result.id,
                task_result.task.module_path,
            )
        fan_out = _fan_out_name(carrier, identity)
        attributes = attributes_of(task_result.task, "process")
        attributes[semconv.MESSAGING_MESSAGE_ID] = str(task_result.id)
        if identity is not None:
            attributes.update(identity.lineage_attributes())
        if fan_out:
            attributes[semconv.NESTED_MODE] = "fan_out"
        span = utils.STATE.tracer.start_span(
            f"process {task_result.task.module_path}",
            context=ctx,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        )
    except Exception:
        log.exception("could not start the consumer span of task %s", task_result.id)
        ctx, identity, span = Context(), None, trace.INVALID_SPAN
    token = context.attach(trace.set_span_in_context(span, ctx))
    _runs[str(task_result.id)] = _Run(span, token, identity, fan_out)


def hold_result(sender: Any = None, instance: Any = None, **kwargs: Any) -> None:
    """``pre_save`` of django_tasks_db's ``DBTaskResult``: a job whose function ended while
    fanned-out children of it are pending stays ``RUNNING`` until the last has ended."""
    run = _runs.get(str(getattr(instance, "id", "")))
    if run is None or run.identity is None or run.fan_out:
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
        if run.identity is not None:
            _end(run, task_result, _last_line(error_type, traceback) if error_type else "")
        try:  # children lost with a killed worker (every 10 s at most)
            _barrier.sweep(force=False)
        except Exception:
            log.warning("could not sweep fan-out jobs", exc_info=True)
    finally:
        run.span.end()
        try:
            context.detach(run.token)
        except Exception:  # pragma: no cover - detached elsewhere
            log.debug("could not detach the context of task %s", task_result.id)


def _end(run: _Run, task_result: Any, error: str) -> None:
    """A task with an identity ended: a child reports to its job's barrier; a job with
    pending children waits for them; any other job completes now."""
    from otel_taskctx.progress import flush_progress

    identity = run.identity
    path = task_result.task.module_path
    try:
        flush_progress(identity.task_key)
    except Exception:
        log.warning("could not write the progress of task %s", identity.task_key, exc_info=True)
    if run.fan_out:
        try:
            _barrier.child_ended(run.fan_out, error, path)
        except Exception:
            log.warning("could not record the end of fan-out child %s", run.fan_out, exc_info=True)
        return
    deferred = False
    if run.held or not run.checked:
        try:
            deferred = _barrier.job_ended(identity.task_key, path, str(task_result.id), error)
        except Exception:  # the barrier table is unreachable: the task ends now
            log.warning("could not check the fan-out children of %s", path, exc_info=True)
    if deferred:
        log.info(
            "task id=%s path=%s returned: it stays RUNNING until its fanned-out children end",
            task_result.id,
            path,
        )
    if not deferred:
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
    released and its held result gets its final status."""
    from django.tasks.base import TaskResultStatus
    from django.utils import timezone

    try:
        _release(job_key)
    finally:
        fields: dict[str, Any] = {"finished_at": timezone.now()}
        if job.error:  # the job's own function failed: its error stays
            fields["status"] = TaskResultStatus.FAILED
        elif failed:
            message = _barrier.failure_message(failed)
            fields.update(
                status=TaskResultStatus.FAILED,
                exception_class_path=CHILD_FAILED,
                traceback=f"{CHILD_FAILED}: {message}",
                return_value=None,
            )
        else:
            fields["status"] = TaskResultStatus.SUCCESSFUL
        try:
            from django_tasks_db.models import DBTaskResult
        except ImportError:  # another backend: its own status stands
            return
        DBTaskResult.objects.filter(id=job.result_id).update(**fields)
        log.log(
            logging.ERROR if fields["status"] == TaskResultStatus.FAILED else logging.INFO,
            "Task id=%s path=%s state=%s (after its fanned-out children)%s",
            job.result_id,
            job.func,
            fields["status"],
            f": {fields['traceback']}" if "traceback" in fields else "",
        )


_barrier.register_completion(_barrier.DJANGO_TASKS, complete)
