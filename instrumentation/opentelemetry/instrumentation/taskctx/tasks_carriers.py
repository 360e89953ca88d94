"""Where a queued ``django.tasks`` task's carrier waits for its worker: beside the task, never
in its arguments (``args``/``kwargs`` are the user's).

What needs a carrier: a fanned-out child (its identity names its job, and is bound to the
child's result id) and, where ``OTEL_TASKCTX["DJANGO_TASKS_TRACE_CONTEXT"]`` is on, a root
task's trace context. A root task's identity never travels: its worker derives it from the
result id. So a deployment that does not fan out pays no statement for any of this.

* django-tasks-db's ``DatabaseBackend``: a :class:`otel_taskctx.models.TaskCarrier` row on
  the database of the task's own row, written in the same transaction (the instrumented
  enqueue runs in :func:`atomic_for`), read when the task starts (:func:`take`; only for a
  function that may be fanned out, or with the trace-context setting on), deleted after it
  ended (:func:`drop`: in batches, so a task pays no commit of its own for it).
* A backend that runs the task in the enqueuing process (``ImmediateBackend``): memory of
  that process, handed from ``task_enqueued`` to ``task_started`` (:func:`hand_over`).
* Any other backend: nothing is stored; its tasks run under their derived identity, and it
  cannot run fanned-out children (refused at the launch).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
from collections import OrderedDict
from typing import Any

log = logging.getLogger("otel_taskctx.instrumentation")

#: carriers of in-process runs kept at most (a backend that never runs what it was given,
#: such as the ``DummyBackend``, must not grow it without end)
LOCAL_MAX = 1024
_local: OrderedDict[str, tuple[Any, str]] = OrderedDict()


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


def hand_over(task_result: Any, carrier: dict[str, str]) -> None:
    """Keep a root task's carrier in memory for a run in this process (no query)."""
    if _in_process(task_result.task.get_backend()):
        _local[str(task_result.id)] = (carrier, "")
        while len(_local) > LOCAL_MAX:
            _local.popitem(last=False)


def _in_process(backend: Any) -> bool:
    from django.tasks.backends.immediate import ImmediateBackend

    return isinstance(backend, ImmediateBackend)


def result_model() -> Any:
    """django-tasks-db's ``DBTaskResult`` model, found through the app registry."""
    from django.apps import apps

    config = next(c for c in apps.get_app_configs() if c.name == "django_tasks_db")
    return config.get_model("DBTaskResult")


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
    """``(carrier, fan_out, from the table)`` stored for the task of ``task_result``, or
    None. The table is asked only where a carrier can be there: for a function that may be
    fanned out, or with the trace-context setting on."""
    result_id = str(task_result.id)
    found = _local.pop(result_id, None)
    if found is not None:
        return (*found, False)
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


#: carriers of ended tasks deleted together: a delete is a commit, which on SQLite with its
#: default settings costs a few milliseconds, more than the rest of the task's instrumentation
DROP_BATCH = 64
_ended: list[str] = []
_atexit_registered = False


def drop(result_id: str) -> None:
    """Forget the carrier of a task that ended (``DatabaseBackend``): deleted with the next
    :data:`DROP_BATCH` - 1 others, or when the process exits (:func:`flush_dropped`)."""
    global _atexit_registered
    _ended.append(result_id)
    if not _atexit_registered:
        atexit.register(flush_dropped)
        _atexit_registered = True
    if len(_ended) >= DROP_BATCH:
        flush_dropped()


def flush_dropped() -> None:
    """Delete the carriers of the tasks that ended in this process since the last flush."""
    ids = _ended[:]
    del _ended[: len(ids)]
    if not ids:
        return
    from otel_taskctx.models import TaskCarrier

    try:
        TaskCarrier.objects.using(database()).filter(result_id__in=ids).delete()
    except Exception:  # the rows stay; they grant nothing (bound to finished tasks)
        log.warning("could not delete the carriers of %d ended tasks", len(ids), exc_info=True)


def drop_now(result_id: str) -> None:
    """Delete the carrier of a task at once (a lost fan-out child, failed by the sweep)."""
    from otel_taskctx.models import TaskCarrier

    TaskCarrier.objects.using(database()).filter(result_id=result_id).delete()


def results_of_children(names: list[str]) -> dict[str, str]:
    """``{fan-out child name: result id}`` of the ``django.tasks`` children among ``names``
    whose carrier is still stored (they never ended)."""
    from django.apps import apps

    if not names or not apps.is_installed("django_tasks_db"):
        return {}
    from otel_taskctx.models import TaskCarrier

    rows = TaskCarrier.objects.using(database()).filter(fan_out__in=names)
    return dict(rows.values_list("fan_out", "result_id"))
