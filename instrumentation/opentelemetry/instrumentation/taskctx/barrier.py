"""The fan-out barrier: which children of a job are pending, and the job's completion (one
path for both queues) once none is; the sweep of lost children (see docs/fan_out.md).

The state lives beside the locks: in Redis where the conflict store is Redis
(:mod:`.barrier_redis`), else in :class:`otel_taskctx.models.FanOutChild` rows, where the
job's own end is a row ``task_id="(job)"``.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from datetime import timedelta
from typing import Any

from django.core.signals import setting_changed
from django.utils import timezone

from otel_taskctx.conf import get_setting

log = logging.getLogger("otel_taskctx.instrumentation")

JOB_ROW = "(job)"
_PREFIX = "fan-out-"
_TOKEN_HEX = 16
_NAME_MAX = 64  # FanOutChild.task_id
_redis_barriers: dict[int, Any] = {}


def _forget_redis(setting: str = "", **kwargs: Any) -> None:
    if setting in ("CACHES", "OTEL_TASKCTX", "POWERCRUD_SETTINGS"):
        _redis_barriers.clear()


setting_changed.connect(_forget_redis, dispatch_uid="otel_taskctx.fan_out_barrier")


def _rows() -> Any:
    from otel_taskctx.models import FanOutChild

    return FanOutChild.objects


def _redis() -> Any:
    """The Redis barrier where the conflict store is Redis, else None (per process)."""
    found = _redis_barriers.get(os.getpid())
    if found is None:
        found = False
        try:
            from django.core.cache import caches

            from otel_taskctx.conflicts.redis_store import supports
            from otel_taskctx.task_manager import tasks_cache_alias

            cache = caches[tasks_cache_alias()]
            if supports(cache):
                from opentelemetry.instrumentation.taskctx.barrier_redis import RedisBarrier

                found = RedisBarrier(cache)
        except Exception:  # no such cache: the database holds the barrier
            log.debug("fan-out barrier: no Redis conflict store", exc_info=True)
        _redis_barriers.clear()
        _redis_barriers[os.getpid()] = found
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


#: jobs this process launched fanned-out children for: only their ends ask the barrier
launched: set[str] = set()


def add_child(job_key: str, name: str, func: str) -> None:
    """The pending record of a child about to be enqueued."""
    launched.add(job_key)
    if redis := _redis():
        redis.add_child(job_key, name, func[:255], named=job_of_name(name) == job_key)
    else:
        _rows().create(job_key=job_key, task_id=name, func=func[:255])


def remove_child(job_key: str, name: str) -> None:
    """Undo :func:`add_child`: the child could not be enqueued."""
    if redis := _redis():
        redis.remove_child(job_key, name)
    else:
        _rows().filter(job_key=job_key, task_id=name).delete()


def child_ended(name: str, error: str, what: str = "") -> str | None:
    """Record a child's end (``error`` empty: it succeeded); complete its job if it was the
    last. Returns the job's key (None: no barrier record has that name)."""
    job_key = job_of_name(name)
    state = "failed" if error else "done"
    if redis := _redis():
        job_key = job_key or redis.job_of(name)
        claimed = redis.child_ended(job_key, name, state, error[:4000]) if job_key else -1
        _complete_claimed(redis, job_key, claimed)
        job_key = job_key if claimed != -1 else None
    else:
        rows = _rows().filter(task_id=name)
        if job_key is None:
            job_key = rows.values_list("job_key", flat=True).first()
        else:
            rows = rows.filter(job_key=job_key)
        now = timezone.now()
        if job_key is None or not rows.update(state=state, error=error[:4000], finished_at=now):
            job_key = None
        else:
            _maybe_complete(job_key)
    if job_key is None:
        log.warning("fan-out child %s (%s) has no barrier record", name, what)
    return job_key


def _complete_claimed(redis: Any, job_key: str | None, claimed: int) -> None:
    if claimed == 1 and job_key:
        complete(job_key, *redis.take(job_key))


def has_children(job_key: str) -> bool:
    if redis := _redis():
        return redis.has_children(job_key)
    return _rows().filter(job_key=job_key).exclude(task_id=JOB_ROW).exists()


def job_ended(job_key: str, func: str, result_id: str = "", error: str = "") -> bool:
    """The job's own function ended. False when it has no fanned-out child (the caller
    completes it now); else its end is recorded and the barrier completes it (maybe now)."""
    launched.discard(job_key)
    if redis := _redis():
        claimed = redis.job_ended(job_key, func[:255], result_id, error[:4000])
        _complete_claimed(redis, job_key, claimed)
        return claimed != -1
    if not has_children(job_key):
        return False
    fields = {"state": "pending", "func": func[:255], "result_id": result_id, "error": error}
    _rows().get_or_create(job_key=job_key, task_id=JOB_ROW, defaults=fields)
    _maybe_complete(job_key)
    return True


def _maybe_complete(job_key: str) -> None:
    """(Database) complete ``job_key`` if its function ended and no child is pending (once:
    its rows are deleted in the same transaction)."""
    from django.db import transaction

    pending = _rows().filter(job_key=job_key, state="pending")
    if list(pending.values_list("task_id", flat=True)[:2]) != [JOB_ROW]:
        return  # the job's function still runs, or a child is pending
    with transaction.atomic(using=_rows().db):
        rows = list(_rows().select_for_update().filter(job_key=job_key))
        job = next((r for r in rows if r.task_id == JOB_ROW), None)
        if job is None or any(r.state == "pending" for r in rows if r is not job):
            return
        _rows().filter(job_key=job_key).delete()
    complete(job_key, job, [r for r in rows if r.state == "failed"])


def discard(job_key: str) -> None:
    """Forget a job's barrier state without completing it (benchmarks)."""
    if redis := _redis():
        redis.discard(job_key)
    else:
        _rows().filter(job_key=job_key).delete()


def failure_message(failed: list[Any]) -> str:
    first = failed[0]
    more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
    return f"fan-out child {first.func} (task {first.task_id}) failed: {first.error}{more}"


def complete(job_key: str, job: Any, failed: list[Any]) -> None:
    """The one completion of a fanned-out job, once its last child has ended: a
    ``django.tasks`` job (``job.result_id``) has its locks released and its held result
    finished; a django-q2 job gets powercrud's completion hook (which releases its locks)."""
    try:
        if job.result_id:
            from opentelemetry.instrumentation.taskctx import runs, tasks_carriers

            try:
                runs.release_locks(job_key)
            finally:
                tasks_carriers.finish_result(job, failure_message(failed) if failed else "")
            return
        from django_q.models import Task
        from powercrud import async_hooks

        if failed:
            Task.objects.filter(name=job_key).update(success=False, result=failure_message(failed))
        task = Task.objects.filter(name=job_key).order_by("-stopped").first()
        if task is not None:
            async_hooks.task_completion_hook(task)
    except Exception:
        log.exception("could not complete fan-out job %s", job_key)


def any_pending() -> bool:
    """Is any fanned-out child pending, of any job?"""
    if redis := _redis():
        return redis.any_pending()
    return _rows().filter(state="pending").exclude(task_id=JOB_ROW).exists()


def sweep(force: bool = True) -> int:
    """Fail children with no result after ``FAN_OUT_TIMEOUT`` seconds and complete their jobs;
    the number failed. (``force`` is accepted for callers of earlier versions.)"""
    from opentelemetry.instrumentation.taskctx import tasks_carriers

    timeout = float(get_setting("FAN_OUT_TIMEOUT") or 0)
    if timeout <= 0:
        return 0
    redis = _redis()
    if redis is not None:
        stale = redis.stale(timeout)
    else:
        since = timezone.now() - timedelta(seconds=timeout)
        rows = _rows().filter(state="pending", created_at__lt=since).exclude(task_id=JOB_ROW)
        stale = list(rows.values_list("job_key", "task_id"))
    results = tasks_carriers.results_of_children([name for _, name in stale])
    failed = 0
    for job_key, name in stale:
        lost = (
            "the db_worker that ran it was killed or lost (django-tasks-db never runs a task "
            "twice), or no db_worker took it in time"
            if name in results
            else "its worker was killed or lost, and the broker did not deliver it again"
        )
        error = f"no result within FAN_OUT_TIMEOUT ({timeout:g} s): {lost}"
        if name in results:
            tasks_carriers.fail_lost(results[name], error)
        if redis is not None:
            claimed = redis.child_ended(job_key, name, "failed", error)
            failed += claimed >= 0
            _complete_claimed(redis, job_key, claimed)
        else:
            rows = _rows().filter(job_key=job_key, task_id=name, state="pending")
            failed += rows.update(state="failed", finished_at=timezone.now(), error=error)
    if redis is None:
        for job_key in {job_key for job_key, _ in stale}:
            _maybe_complete(job_key)
    return failed


# the sweeper: one daemon thread per process that met fan-out work, while a child is pending
_sweeper_lock = threading.Lock()
_sweeper: tuple[int, threading.Thread] | None = None
#: set to stop the thread early (tests)
stop_sweeping = threading.Event()


def sweeping() -> bool:
    return _sweeper is not None and _sweeper[0] == os.getpid() and _sweeper[1].is_alive()


def ensure_sweeping() -> None:
    """Start this process's sweeper thread if it is not running (and a timeout is set)."""
    global _sweeper
    try:
        if sweeping() or float(get_setting("FAN_OUT_TIMEOUT") or 0) <= 0:
            return
    except Exception:  # settings not configured
        return
    with _sweeper_lock:
        if sweeping():
            return
        from otel_taskctx.context import start_detached

        stop_sweeping.clear()
        interval = float(get_setting("FAN_OUT_SWEEP_INTERVAL") or 10)
        thread = threading.Thread(target=_sweep_while_pending, args=(interval,), daemon=True)
        thread.name = "otel_taskctx-fan-out-sweeper"
        _sweeper = (os.getpid(), thread)
        start_detached(thread)  # outside the job that happened to start it


def _sweep_while_pending(interval: float) -> None:
    global _sweeper
    from django.db import connections

    pending = True
    try:
        while pending and not stop_sweeping.wait(interval):
            try:
                if failed := sweep():
                    log.warning("fan-out sweep: %d lost children failed their jobs", failed)
                pending = any_pending()
            except Exception:
                log.warning("could not sweep fan-out jobs", exc_info=True)
        with _sweeper_lock:
            if _sweeper is not None and _sweeper[1] is threading.current_thread():
                _sweeper = None
        if not stop_sweeping.is_set() and any_pending():  # a child added after the last look
            ensure_sweeping()
    except Exception:
        log.debug("could not look for pending fan-out children", exc_info=True)
    finally:
        connections.close_all()  # this thread's own connections
