"""django-tasks-db's side of ``django.tasks``: carriers beside queued tasks, and the final
status of a result held for its fanned-out children.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
from typing import Any

log = logging.getLogger("otel_taskctx.instrumentation")


def is_database_backend(backend: Any) -> bool:
    """Is ``backend`` django-tasks-db's ``DatabaseBackend`` (its app installed)?"""
    from django.apps import apps

    if not apps.is_installed("django_tasks_db"):
        return False
    from django_tasks_db.backend import DatabaseBackend

    return isinstance(backend, DatabaseBackend)


def carries_roots(backend: Any) -> bool:
    """Does a root task enqueued on ``backend`` get a carrier row (its trace context)?"""
    from otel_taskctx.conf import get_setting

    return bool(get_setting("DJANGO_TASKS_TRACE_CONTEXT")) and is_database_backend(backend)


def result_model() -> Any:
    from django_tasks_db.models import DBTaskResult

    return DBTaskResult


def database() -> str:
    """The database alias that django-tasks-db writes its results to."""
    from django.db import router

    return router.db_for_write(result_model())


def atomic_for(backend: Any) -> Any:
    """A transaction on the task rows' database for a ``DatabaseBackend`` enqueue (the task's
    row and its carrier commit together), else nothing."""
    if is_database_backend(backend):
        from django.db import transaction

        return transaction.atomic(using=database())
    return contextlib.nullcontext()


def store(task_result: Any, carrier: dict[str, str], fan_out: str = "") -> None:
    """Keep ``carrier`` beside a ``DatabaseBackend`` task, in the enqueue's transaction."""
    from otel_taskctx.models import TaskCarrier

    TaskCarrier.objects.using(database()).create(
        result_id=str(task_result.id), carrier=carrier, fan_out=fan_out
    )


def take(task_result: Any) -> tuple[Any, str, bool] | None:
    """``(carrier, fan_out, True)`` of the task, or None; asked only of a function that may be
    fanned out, or with the trace-context setting on."""
    result_id = str(task_result.id)
    task = task_result.task
    if not is_database_backend(task.get_backend()):
        return None
    from otel_taskctx import policy

    if not carries_roots(task.get_backend()) and not policy.may_fan_out(task.func):
        return None
    from otel_taskctx.models import TaskCarrier

    row = (
        TaskCarrier.objects.using(database())
        .filter(result_id=result_id)
        .values_list("carrier", "fan_out")
        .first()
    )
    return (row[0], row[1], True) if row is not None else None


#: carriers of ended tasks deleted together (a commit costs more than the rest of a task)
DROP_BATCH = 64
_ended: list[str] = []


def drop(result_id: str) -> None:
    """Forget the carrier of a task that ended: deleted in batches, or at exit."""
    _ended.append(result_id)
    if len(_ended) >= DROP_BATCH:
        flush_dropped()


@atexit.register
def flush_dropped() -> None:
    ids = _ended[:]
    del _ended[: len(ids)]
    if not ids:
        return
    from otel_taskctx.models import TaskCarrier

    try:
        TaskCarrier.objects.using(database()).filter(result_id__in=ids).delete()
    except Exception:  # the rows stay; they grant nothing (bound to finished tasks)
        log.warning("could not delete the carriers of %d ended tasks", len(ids), exc_info=True)


def results_of_children(names: list[str]) -> dict[str, str]:
    """``{fan-out child name: result id}`` of the ``django.tasks`` children among ``names``
    whose carrier is still stored (they never ended)."""
    from django.apps import apps

    if not names or not apps.is_installed("django_tasks_db"):
        return {}
    from otel_taskctx.models import TaskCarrier

    rows = TaskCarrier.objects.using(database()).filter(fan_out__in=names)
    return dict(rows.values_list("fan_out", "result_id"))


def fail_lost(result_id: str, error: str) -> None:
    """A lost fan-out child's own result: ``FAILED`` through django-tasks-db's
    ``set_failed`` unless it ended meanwhile; its carrier is deleted."""
    from django.tasks.base import TaskResultStatus

    from otel_taskctx.errors import FanOutChildLost
    from otel_taskctx.models import TaskCarrier

    try:
        unfinished = (TaskResultStatus.READY, TaskResultStatus.RUNNING)
        result = result_model().objects.filter(id=result_id, status__in=unfinished).first()
        if result is not None:
            result.set_failed(FanOutChildLost(error))
        TaskCarrier.objects.using(database()).filter(result_id=result_id).delete()
    except Exception:
        log.warning("could not fail the result of lost child %s", result_id, exc_info=True)


def finish_result(job: Any, children_failure: str) -> None:
    """The final status of a job's result held ``RUNNING`` for its children, through
    django-tasks-db's ``set_successful`` / ``set_failed`` (the job's own failure, already
    recorded, only gets its status and end time back)."""
    from django.apps import apps
    from django.tasks.base import TaskResultStatus
    from django.utils import timezone

    from otel_taskctx.errors import FanOutChildFailed

    if not apps.is_installed("django_tasks_db"):  # another backend: its own status stands
        return
    result = result_model().objects.filter(id=job.result_id).first()
    if result is None:
        log.warning("fan-out job %s has no task result", job.result_id)
        return
    if job.error:
        result.status = TaskResultStatus.FAILED
        result.finished_at = timezone.now()
        result.save(update_fields=["status", "finished_at"])
    elif children_failure:
        result.set_failed(FanOutChildFailed(children_failure))
    else:
        result.set_successful(result.return_value)
    failed = result.status == TaskResultStatus.FAILED
    log.log(
        logging.ERROR if failed else logging.INFO,
        "Task id=%s path=%s state=%s (after its fanned-out children)%s",
        job.result_id,
        job.func,
        result.status,
        f": otel_taskctx.errors.FanOutChildFailed: {children_failure}" if children_failure else "",
    )
