"""The fan-out barrier: which children of a job are pending, and the job's completion once
none is. Shared by django-q2 fan-out (:mod:`._fan_out`) and ``django.tasks`` fan-out
(:mod:`._tasks_fan_out`).

* Whether a nested launch fans out is decided by :func:`otel_taskctx.policy.nested_launch`.
* The state lives beside the locks: in Redis where the conflict store is Redis (the
  ``TASKS_CACHE`` / powercrud cache is a django-redis cache; :mod:`._barrier_redis`), else in
  the database (:class:`otel_taskctx.models.FanOutChild`). Either way it survives a worker
  restart and needs no result backend: a pending record per child, written before the child
  is enqueued (:func:`add_child`; its name, from :func:`child_name`, carries the job's key),
  and, once the job's own function has ended, the job's record (:func:`job_ended`; in the
  database a row ``task_id="(job)"``). A child's end is one update of its record
  (:func:`child_ended`).
* When the job has ended and no child is pending, the job's records are deleted and its
  queue's completion runs, once: ``completion(job_key, job, failed_children)`` (registered by
  each queue with :func:`register_completion`; the job's ``result_id`` names a
  ``django.tasks`` result, else the job is a django-q2 task).
* :func:`sweep` fails children with no result after ``OTEL_TASKCTX["FAN_OUT_TIMEOUT"]``
  seconds (their worker was killed and the broker did not deliver them again) and completes
  their jobs; a lost ``django.tasks`` child's own result becomes ``FAILED`` too. The processes
  that meet fan-out work run it by themselves (:mod:`.sweeper`).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from typing import Any

log = logging.getLogger("otel_taskctx.instrumentation")

#: ``task_id`` of the row that records the job's own end
JOB_ROW = "(job)"
DJANGO_Q = "django_q"
DJANGO_TASKS = "django_tasks"
_PREFIX = "fan-out-"
_TOKEN_HEX = 16
_NAME_MAX = 64  # FanOutChild.task_id

_completions: dict[str, Callable[[str, Any, list[Any]], Any]] = {}


def register_completion(queue: str, completion: Callable[[str, Any, list[Any]], Any]) -> None:
    _completions[queue] = completion


def _complete(job_key: str, job: Any, failed: list[Any]) -> Any:
    completion = _completions.get(DJANGO_TASKS if job.result_id else DJANGO_Q)
    if completion is None:
        log.error("fan-out job %s: no completion for its queue in this process", job_key)
        return None
    return completion(job_key, job, failed)


_redis_barriers: dict[int, Any] = {}


def _forget_redis(setting: str = "", **kwargs: Any) -> None:
    """Settings changed (tests): the barrier's store is looked up again."""
    if setting in ("CACHES", "OTEL_TASKCTX", "POWERCRUD_SETTINGS"):
        _redis_barriers.clear()


def _connect_setting_changed() -> None:
    from django.core.signals import setting_changed

    setting_changed.connect(_forget_redis, dispatch_uid="otel_taskctx.fan_out_barrier")


_connect_setting_changed()


def _redis() -> Any:
    """The Redis barrier where the conflict store is Redis, else None (per process)."""
    pid = os.getpid()
    found = _redis_barriers.get(pid)
    if found is None:
        found = False
        try:
            from django.core.cache import caches

            from otel_taskctx.conflicts.redis_store import supports
            from otel_taskctx.task_manager import tasks_cache_alias

            cache = caches[tasks_cache_alias()]
            if supports(cache):
                from opentelemetry.instrumentation.taskctx._barrier_redis import RedisBarrier

                found = RedisBarrier(cache)
        except Exception:  # no such cache: the database holds the barrier
            log.debug("fan-out barrier: no Redis conflict store", exc_info=True)
        _redis_barriers.clear()
        _redis_barriers[pid] = found
    return found or None


def child_name(job_key: str) -> str:
    """A new child's name: unique, and carrying ``job_key`` when it fits."""
    name = f"{_PREFIX}{uuid.uuid4().hex[:_TOKEN_HEX]}-{job_key}"
    return name if len(name) <= _NAME_MAX else f"{_PREFIX}{uuid.uuid4().hex}"


def job_of_name(name: str) -> str | None:
    """The job key a :func:`child_name` carries (None for the long-key form)."""
    cut = len(_PREFIX) + _TOKEN_HEX
    if name.startswith(_PREFIX) and len(name) > cut + 1 and name[cut] == "-":
        return name[cut + 1 :]
    return None


#: keys of the jobs that this process launched fanned-out children for: only their ends ask
#: the barrier (a job that fanned out nothing costs no barrier query)
_launched: set[str] = set()


def launched_here(job_key: str) -> bool:
    """Did this process launch a fanned-out child of ``job_key``?"""
    return job_key in _launched


def forget_launched(job_key: str) -> None:
    _launched.discard(job_key)


def add_child(job_key: str, name: str, func: str) -> None:
    """The pending record of a child about to be enqueued."""
    _launched.add(job_key)
    redis = _redis()
    if redis is not None:
        return redis.add_child(job_key, name, func[:255], named=job_of_name(name) == job_key)
    from otel_taskctx.models import FanOutChild

    FanOutChild.objects.create(job_key=job_key, task_id=name, func=func[:255])
    return None


def remove_child(job_key: str, name: str) -> None:
    """Undo :func:`add_child`: the child could not be enqueued."""
    redis = _redis()
    if redis is not None:
        return redis.remove_child(job_key, name)
    from otel_taskctx.models import FanOutChild

    FanOutChild.objects.filter(job_key=job_key, task_id=name).delete()
    return None


def child_ended(name: str, error: str, what: str = "") -> str | None:
    """Record a child's end (``error`` empty: it succeeded); complete its job if it was the
    last. Returns the job's key (None: no barrier record has that name)."""
    job_key = job_of_name(name)
    state = "failed" if error else "done"
    redis = _redis()
    if redis is not None:
        job_key = job_key or redis.job_of(name)
        claimed = redis.child_ended(job_key, name, state, error[:4000]) if job_key else -1
        _complete_claimed(redis, job_key, claimed)
        job_key = job_key if claimed != -1 else None
    else:
        job_key = _child_ended_in_database(job_key, name, state, error)
    if job_key is None:
        log.warning("fan-out child %s (%s) has no barrier record", name, what)
        return None
    return job_key


def _complete_claimed(redis: Any, job_key: str | None, claimed: int) -> None:
    """(Redis) run the completion of a job that a script claimed (``claimed == 1``)."""
    if claimed == 1 and job_key:
        _complete(job_key, *redis.take(job_key))


def _child_ended_in_database(job_key: str | None, name: str, state: str, error: str) -> str | None:
    """The job's key, once the child's row is updated (None: no such row)."""
    from django.utils import timezone

    from otel_taskctx.models import FanOutChild

    rows = FanOutChild.objects.filter(task_id=name)
    if job_key is None:
        job_key = rows.values_list("job_key", flat=True).first()
    else:
        rows = rows.filter(job_key=job_key)
    if job_key is None or not rows.update(
        state=state, error=error[:4000], finished_at=timezone.now()
    ):
        return None
    maybe_complete(job_key)
    return job_key


def has_children(job_key: str) -> bool:
    redis = _redis()
    if redis is not None:
        return redis.has_children(job_key)
    from otel_taskctx.models import FanOutChild

    return FanOutChild.objects.filter(job_key=job_key).exclude(task_id=JOB_ROW).exists()


def job_ended(job_key: str, func: str, result_id: str = "", error: str = "") -> bool:
    """The job's own function ended. False when it has no fanned-out child (the caller
    completes it now); else its end is recorded and the barrier completes it (maybe now)."""
    redis = _redis()
    if redis is not None:
        claimed = redis.job_ended(job_key, func[:255], result_id, error[:4000])
        if claimed == -1:
            return False
        _complete_claimed(redis, job_key, claimed)
        return True
    from otel_taskctx.models import FanOutChild

    if not has_children(job_key):
        return False
    FanOutChild.objects.get_or_create(
        job_key=job_key,
        task_id=JOB_ROW,
        defaults={
            "state": FanOutChild.State.PENDING,
            "func": func[:255],
            "result_id": result_id,
            "error": error[:4000],
        },
    )
    maybe_complete(job_key)
    return True


def maybe_complete(job_key: str) -> Any:
    """(Database) run the completion of ``job_key`` if its function ended and no child is
    pending (once: the job's rows are deleted in the same transaction)."""
    from django.db import transaction

    from otel_taskctx.models import FanOutChild

    pending = FanOutChild.objects.filter(job_key=job_key, state=FanOutChild.State.PENDING)
    if list(pending.values_list("task_id", flat=True)[:2]) != [JOB_ROW]:
        return None  # the job's function still runs, or a child is pending: nothing to do yet
    with transaction.atomic(using=FanOutChild.objects.db):
        rows = list(FanOutChild.objects.select_for_update().filter(job_key=job_key))
        job = next((r for r in rows if r.task_id == JOB_ROW), None)
        children = [r for r in rows if r.task_id != JOB_ROW]
        if job is None or job.state != FanOutChild.State.PENDING:
            return None
        if any(r.state == FanOutChild.State.PENDING for r in children):
            return None
        # the job is complete: its barrier rows are not needed any more
        FanOutChild.objects.filter(job_key=job_key).delete()
    return _complete(job_key, job, [r for r in children if r.state == FanOutChild.State.FAILED])


def discard(job_key: str) -> None:
    """Forget a job's barrier state without completing it (benchmarks)."""
    redis = _redis()
    if redis is not None:
        return redis.discard(job_key)
    from otel_taskctx.models import FanOutChild

    FanOutChild.objects.filter(job_key=job_key).delete()
    return None


def failure_message(failed: list[Any]) -> str:
    """What a job's result says when fanned-out children failed."""
    first = failed[0]
    more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
    return f"fan-out child {first.func} (task {first.task_id}) failed: {first.error}{more}"


def any_pending() -> bool:
    """Is any fanned-out child pending, of any job?"""
    redis = _redis()
    if redis is not None:
        return redis.any_pending()
    from otel_taskctx.models import FanOutChild

    pending = FanOutChild.objects.filter(state=FanOutChild.State.PENDING)
    return pending.exclude(task_id=JOB_ROW).exists()


def _lost_message(timeout: float, tasks_child: bool) -> str:
    if tasks_child:
        return (
            f"no result within FAN_OUT_TIMEOUT ({timeout:g} s): the db_worker that ran it was "
            "killed or lost (django-tasks-db never runs a task twice), or no db_worker took it "
            "in time"
        )
    return (
        f"no result within FAN_OUT_TIMEOUT ({timeout:g} s): its worker was killed or lost, "
        "and the broker did not deliver it again"
    )


def _fail_lost_result(result_id: str, error: str) -> None:
    """A lost ``django.tasks`` child's own result: ``FAILED`` with ``error`` (through
    django-tasks-db's ``set_failed``), unless it ended meanwhile; its carrier is dropped."""
    from django.tasks.base import TaskResultStatus
    from opentelemetry.instrumentation.taskctx import tasks_carriers

    from otel_taskctx.errors import FanOutChildLost

    model = tasks_carriers.result_model()
    unfinished = (TaskResultStatus.READY, TaskResultStatus.RUNNING)
    db_result = model.objects.filter(id=result_id, status__in=unfinished).first()
    if db_result is not None:
        db_result.set_failed(FanOutChildLost(error))
    tasks_carriers.drop_now(result_id)


def sweep(force: bool = True) -> int:
    """Fail children with no result after ``FAN_OUT_TIMEOUT`` seconds and complete their jobs.
    Returns the number of children failed. (``force`` is accepted for callers of earlier
    versions; every call sweeps.)"""
    from datetime import timedelta

    from django.utils import timezone
    from opentelemetry.instrumentation.taskctx import tasks_carriers

    from otel_taskctx.conf import get_setting

    timeout = float(get_setting("FAN_OUT_TIMEOUT") or 0)
    if timeout <= 0:
        return 0
    redis = _redis()
    if redis is not None:
        stale = redis.stale(timeout)
    else:
        from otel_taskctx.models import FanOutChild

        rows = FanOutChild.objects.filter(
            state=FanOutChild.State.PENDING,
            created_at__lt=timezone.now() - timedelta(seconds=timeout),
        ).exclude(task_id=JOB_ROW)
        stale = list(rows.values_list("job_key", "task_id"))
    if not stale:
        return 0
    results = tasks_carriers.results_of_children([name for _, name in stale])
    failed = 0
    for job_key, name in stale:
        error = _lost_message(timeout, name in results)
        if name in results:
            try:
                _fail_lost_result(results[name], error)
            except Exception:
                log.warning("could not fail the result of lost child %s", name, exc_info=True)
        if redis is not None:
            claimed = redis.child_ended(job_key, name, "failed", error)
            failed += claimed >= 0
            _complete_claimed(redis, job_key, claimed)
        else:
            from otel_taskctx.models import FanOutChild

            failed += FanOutChild.objects.filter(
                job_key=job_key, task_id=name, state=FanOutChild.State.PENDING
            ).update(state=FanOutChild.State.FAILED, finished_at=timezone.now(), error=error)
    if redis is None:
        for job_key in {job_key for job_key, _ in stale}:
            maybe_complete(job_key)
    return failed
