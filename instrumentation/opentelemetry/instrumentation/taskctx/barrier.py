"""The fan-out barrier: which children of a job are pending, the job's one completion once
none is, and the sweep that fails children lost with their worker (a lazy daemon thread per
process while any child is pending). See docs/fan_out.md.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django.core.signals import setting_changed
from opentelemetry.instrumentation.taskctx import tasks_carriers
from opentelemetry.instrumentation.taskctx.barrier_stores import (
    JOB_ROW,
    DatabaseBarrier,
    RedisBarrier,
    Row,
)

from otel_taskctx.conf import get_setting

log = logging.getLogger("otel_taskctx.instrumentation")

__all__ = ["JOB_ROW", "DatabaseBarrier", "RedisBarrier", "Row"]

_PREFIX = "fan-out-"
_TOKEN_HEX = 16
_NAME_MAX = 64  # FanOutChild.task_id

_stores: dict[int, Any] = {}


def _forget_store(setting: str = "", **kwargs: Any) -> None:
    if setting in ("CACHES", "OTEL_TASKCTX", "POWERCRUD_SETTINGS"):
        _stores.clear()


setting_changed.connect(_forget_store, dispatch_uid="otel_taskctx.fan_out_barrier")


def store() -> Any:
    """The Redis barrier where the conflict store is Redis, else the database's (per process)."""
    found = _stores.get(os.getpid())
    if found is None:
        found = None
        try:
            from django.core.cache import caches

            from otel_taskctx.conflicts.redis_store import supports
            from otel_taskctx.task_manager import tasks_cache_alias

            cache = caches[tasks_cache_alias()]
            found = RedisBarrier(cache) if supports(cache) else None
        except Exception:  # no such cache: the database holds the barrier
            log.debug("fan-out barrier: no Redis conflict store", exc_info=True)
        _stores.clear()
        found = _stores[os.getpid()] = found or DatabaseBarrier()
    return found


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
    store().add_child(job_key, name, func[:255], named=job_of_name(name) == job_key)


@contextmanager
def new_child(identity: Any, func: str) -> Iterator[tuple[str, Any]]:
    """The pending record of a child of ``identity``'s job for the enqueue in the block
    (removed if it fails): ``(its name, its identity)``."""
    name = child_name(identity.task_key)
    add_child(identity.task_key, name, func)
    try:
        yield name, identity.child(identity.task_key, identity.manager_class_path)
    except BaseException:
        remove_child(identity.task_key, name)
        raise
    ensure_sweeper()


def remove_child(job_key: str, name: str) -> None:
    """Undo :func:`add_child`: the child could not be enqueued."""
    store().remove_child(job_key, name)


def has_children(job_key: str) -> bool:
    return store().has_children(job_key)


def child_ended(name: str, error: str, what: str = "") -> str | None:
    """Record a child's end (``error`` empty: success), completing its job after the last;
    the job's key (None: no such record)."""
    barrier = store()
    job_key = job_of_name(name) or barrier.job_of(name)
    state = "failed" if error else "done"
    claimed = barrier.child_ended(job_key, name, state, error[:4000]) if job_key else -1
    if claimed == -1:
        log.warning("fan-out child %s (%s) has no barrier record", name, what)
        return None
    if claimed == 1:
        complete(job_key, *barrier.take(job_key))
    return job_key


def job_ended(job_key: str, func: str, result_id: str = "", error: str = "") -> bool:
    """The job's function ended: False without fanned-out children or with the barrier
    unreachable (the caller completes it now), else the barrier completes it after them."""
    launched.discard(job_key)
    try:
        barrier = store()
        claimed = barrier.job_ended(job_key, func[:255], result_id, error[:4000])
    except Exception:
        log.warning("could not check the fan-out children of job %s", job_key, exc_info=True)
        return False
    if claimed == 1:
        complete(job_key, *barrier.take(job_key))
    elif claimed == 0:  # the sweeper fails its lost children while it waits
        ensure_sweeper()
    return claimed != -1


def discard(job_key: str) -> None:
    """Forget a job's barrier state without completing it (benchmarks)."""
    store().discard(job_key)


def failure_message(failed: list[Any]) -> str:
    first = failed[0]
    more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
    return f"fan-out child {first.func} (task {first.task_id}) failed: {first.error}{more}"


#: ``(owns(job_key, result_id), complete(job_key, job, children_failure))`` of front ends
#: that complete their own jobs (Celery's: ``celery_jobs``, registered when it is imported)
completions: list[tuple[Any, Any]] = []


def complete(job_key: str, job: Any, failed: list[Any]) -> None:
    """Complete a fanned-out job after its last child: through :data:`completions` (Celery);
    a ``django.tasks`` job's locks and held result; a django-q2 job through powercrud's hook."""
    try:
        for owns, finish in completions:
            if owns(job_key, job.result_id):
                finish(job_key, job, failure_message(failed) if failed else "")
                return
        if job.result_id:
            from otel_taskctx.conflicts import release_locks
            from otel_taskctx.descendants import resolve_manager
            from otel_taskctx.identity import TaskIdentity
            from otel_taskctx.task_manager import TASK_MANAGER_PATH

            try:
                release_locks(job_key, resolve_manager(TaskIdentity(job_key, TASK_MANAGER_PATH)))
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


def sweep(force: bool = True) -> int:
    """Fail children with no result after ``FAN_OUT_TIMEOUT`` seconds and complete their jobs;
    the number failed. (``force`` is accepted for callers of earlier versions.)"""
    timeout = float(get_setting("FAN_OUT_TIMEOUT") or 0)
    if timeout <= 0:
        return 0
    stale = store().stale(timeout)
    results = tasks_carriers.results_of_children([name for _, name in stale])
    failed = 0
    for _, name in stale:
        lost = (
            "the db_worker that ran it was killed or lost (django-tasks-db never runs a task "
            "twice), or no db_worker took it in time"
            if name in results
            else "its worker was killed or lost, and the broker did not deliver it again"
        )
        error = f"no result within FAN_OUT_TIMEOUT ({timeout:g} s): {lost}"
        if name in results:
            tasks_carriers.fail_lost(results[name], error)
        failed += child_ended(name, error, "lost") is not None
    return failed


_lock = threading.Lock()
_thread: tuple[int, threading.Thread] | None = None
#: set to stop the thread early (tests)
stopping = threading.Event()


def running() -> bool:
    return _thread is not None and _thread[0] == os.getpid() and _thread[1].is_alive()


def ensure_sweeper() -> None:
    """Start this process's sweeper thread if it is not running (and a timeout is set)."""
    global _thread
    try:
        if running() or float(get_setting("FAN_OUT_TIMEOUT") or 0) <= 0:
            return
    except Exception:  # settings not configured
        return
    with _lock:
        if running():
            return
        from otel_taskctx.context import start_detached

        stopping.clear()
        interval = float(get_setting("FAN_OUT_SWEEP_INTERVAL") or 10)
        thread = threading.Thread(target=_run, args=(interval,), daemon=True)
        thread.name = "otel_taskctx-fan-out-sweeper"
        _thread = (os.getpid(), thread)
        start_detached(thread)  # outside the job that happened to start it


def _run(interval: float) -> None:
    global _thread
    from django.db import connections

    pending = True
    try:
        while pending and not stopping.wait(interval):
            try:
                if failed := sweep():
                    log.warning("fan-out sweep: %d lost children failed their jobs", failed)
                pending = store().any_pending()
            except Exception:
                log.warning("could not sweep fan-out jobs", exc_info=True)
        with _lock:
            if _thread is not None and _thread[1] is threading.current_thread():
                _thread = None
        if not stopping.is_set() and store().any_pending():  # added after the last look
            ensure_sweeper()
    except Exception:
        log.debug("could not look for pending fan-out children", exc_info=True)
    finally:
        connections.close_all()  # this thread's own connections
