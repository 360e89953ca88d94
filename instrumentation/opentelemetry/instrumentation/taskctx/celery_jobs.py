"""How a Celery job ends: at once (its locks released, ``job_completed`` sent), or, with
fanned-out children pending, after the last of them (``barrier.complete``), its result held
in the backend meanwhile (see docs/celery.md, *What ends a job*).
"""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry.instrumentation.taskctx import barrier

from otel_taskctx.identity import TaskIdentity
from otel_taskctx.task_manager import TASK_MANAGER_PATH

log = logging.getLogger("otel_taskctx.instrumentation")

#: the state of a job whose function ended while fanned-out children run (not ready)
WAITING = "FAN_OUT_WAITING"
#: a root job's key: ``celery-<task id>``
KEY_PREFIX = "celery-"


def job_key(task_id: str) -> str:
    return f"{KEY_PREFIX}{task_id}"


def is_celery_job(key: str, task_id: str) -> bool:
    return bool(task_id) and key == job_key(task_id)


def _worker_request(identity: TaskIdentity) -> Any:
    """The running Celery request of ``identity``'s job in this process, or None."""
    from celery import current_app

    task = current_app.current_worker_task
    request = getattr(task, "request", None)
    if request is None or identity.task_key != job_key(request.id):
        return None
    return request


def hold_result(identity: TaskIdentity) -> None:
    """The job fans out: Celery must not store its result when its function returns (the
    job is not over); :func:`end` keeps it as :data:`WAITING` instead."""
    request = _worker_request(identity)
    if request is None or getattr(request, "is_eager", False) or request.ignore_result:
        return  # (held already, or no result wanted)
    request.otel_taskctx_held = True  # stored when the job completes
    request.ignore_result = True


def _backend(task: Any = None) -> Any:
    """The app's result backend, or None (none configured)."""
    from celery import current_app
    from celery.backends.base import DisabledBackend

    backend = (task.backend if task is not None else None) or current_app.backend
    return None if isinstance(backend, DisabledBackend) else backend


def end(
    identity: TaskIdentity,
    fan_out: str,
    task: Any,
    task_id: str,
    error: str,
    retval: Any,
    exception: Any,
    lost: bool = False,
) -> None:
    """The run of ``task_id`` under ``identity`` ended (``error`` empty: success; ``lost``:
    in another process, which may have fanned out)."""
    key = identity.task_key
    launched = key in barrier.launched
    barrier.launched.discard(key)
    if fan_out:  # a child reports to its job's barrier
        try:
            barrier.child_ended(fan_out, error, task.name)
        except Exception:
            log.warning("could not record the end of fan-out child %s", fan_out, exc_info=True)
        return
    if not is_celery_job(key, task_id):  # an identity of another queue: nothing to end
        return
    request = getattr(task, "request", None)
    held = bool(getattr(request, "otel_taskctx_held", False)) and request.id == task_id
    if launched or lost:
        if held:
            _keep_waiting(task, task_id, retval, exception)
        if barrier.job_ended(key, task.name, task_id, error):
            log.info("Celery task %s (%s) returned: its job ends after its children", task_id, key)
            return
    from otel_taskctx.conflicts.base import reserved_here

    # a job that reserved nothing here (and fanned out nothing) has no lock to release
    _finish(key, task_id, task.name, error, held, None, release=lost or key in reserved_here)


def _keep_waiting(task: Any, task_id: str, retval: Any, exception: Any) -> None:
    backend = _backend(task)
    if backend is None:
        return
    kept = {"error": backend.prepare_exception(exception)} if exception else {"result": retval}
    try:
        backend.store_result(task_id, kept, WAITING)
    except Exception:
        log.warning("could not keep the result of Celery job %s", task_id, exc_info=True)


def _finish(
    key: str,
    task_id: str,
    name: str,
    error: str,
    held: bool,
    failed: str | None,
    release: bool = True,
) -> None:
    """Release the job's locks, store its held result, send ``job_completed``."""
    from otel_taskctx.conflicts import release_locks
    from otel_taskctx.conflicts.base import reserved_here
    from otel_taskctx.descendants import resolve_manager
    from otel_taskctx.signals import job_completed

    reserved_here.discard(key)
    try:
        if release or held:
            release_locks(key, resolve_manager(TaskIdentity(key, TASK_MANAGER_PATH)))
    except Exception:
        log.warning("could not release the locks of Celery job %s", key, exc_info=True)
    error = error or failed or ""
    if held:  # it ended after its fanned-out children: say so, as Celery did for its function
        _store_final(task_id, failed)
        level = logging.ERROR if error else logging.INFO
        log.log(
            level,
            "Celery job %s (%s) ended after its fanned-out children%s",
            task_id,
            name,
            f": {error}" if error else "",
        )
    try:
        job_completed.send(sender=name, task_key=key, task_id=task_id, error=error)
    except Exception:
        log.exception("a job_completed receiver failed for Celery job %s", key)


def _store_final(task_id: str, children_failure: str | None) -> None:
    """The held result becomes final: the job's own, or a child's failure."""
    from otel_taskctx.errors import FanOutChildFailed

    backend = _backend()
    if backend is None:
        return
    try:
        meta = backend.get_task_meta(task_id, cache=False)
        if meta.get("status") != WAITING:  # not held (or stored since): it stands
            return
        kept = meta.get("result") if isinstance(meta.get("result"), dict) else {}
        if kept.get("error"):
            backend.mark_as_failure(task_id, backend.exception_to_python(kept["error"]))
        elif children_failure:
            backend.mark_as_failure(task_id, FanOutChildFailed(children_failure))
        else:
            backend.mark_as_done(task_id, kept.get("result"))
    except Exception:
        log.exception("could not store the final state of Celery job %s", task_id)


def complete(job_key: str, job: Any, children_failure: str) -> None:
    """``barrier.complete`` of a Celery job: its last child ended."""
    _finish(job_key, job.result_id, job.func, job.error, True, children_failure or None)


barrier.completions.append((is_celery_job, complete))
