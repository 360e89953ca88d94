"""Fan-out: a nested launch inside a job runs as a real job on another worker, and the job
ends (powercrud's completion: status, lock release, progress end, dashboard) only when the
last of them has.

* Chosen by settings: ``OTEL_TASKCTX["NESTED_POLICY"] = "fan_out"`` for every nested launch,
  or ``OTEL_TASKCTX["FAN_OUT"]`` listing the functions that fan out (inline stays the
  default).
* :func:`launch` (inside a job): the child's descendant locks (``conflict_ids``) are reserved
  under the job's key first, all-or-nothing; a pending row goes into the barrier table
  (:class:`otel_taskctx.models.FanOutChild`); then the child is enqueued (inside a database
  transaction: when it commits, so the child sees what the job wrote) with an identity
  that keeps the job's key (depth + 1), so its own locks, progress and fan-outs count against
  the same job. Its completion hook is :func:`child_done`.
* powercrud's ``task_completion_hook`` is wrapped (:func:`deferred_completion`): when the
  job's own function ends while children are pending, its end is recorded and the hook
  returns; the last child's :func:`child_done` runs powercrud's completion then. No worker
  waits, so a 1-worker cluster cannot deadlock.
* A failed child (an exception, or ``False`` returned) fails the job: its Task row gets
  ``success=False`` and a result naming the child, its exception and message. Siblings keep
  running; the job ends when all have.
* A worker killed under a child: the ORM broker redelivers the child after
  ``Q_CLUSTER["retry"]`` seconds and the job waits for it. A child without a result after
  ``OTEL_TASKCTX["FAN_OUT_TIMEOUT"]`` seconds (the Redis broker does not redeliver) is failed
  by :func:`sweep`, which fails its job and runs the job's completion (locks released). Every
  completion hook sweeps, and so does powercrud's cleanup (``pcrud_cleanup_async``, which
  powercrud can schedule), whose ``cleanup_completed_tasks`` is wrapped.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from opentelemetry import context
from opentelemetry.instrumentation.taskctx import utils

from otel_taskctx.context import context_with_identity
from otel_taskctx.errors import FanOutUnavailable
from otel_taskctx.identity import TaskIdentity

log = logging.getLogger("otel_taskctx.instrumentation")

#: ``task_id`` of the row that records the job's own end
JOB_ROW = "(job)"
CHILD_HOOK = f"{__name__}.child_done"


def wanted(func: Any) -> bool:
    """Fan ``func`` out (instead of running it inline)?"""
    try:
        from otel_taskctx.conf import get_setting

        if get_setting("NESTED_POLICY") == "fan_out":
            return True
        listed = get_setting("FAN_OUT") or ()
    except Exception:  # settings not configured
        return False
    return bool(listed) and utils.func_path(func) in set(listed)


def configured() -> bool:
    """Does anything fan out in this deployment (else completions are never deferred)?"""
    try:
        from otel_taskctx.conf import get_setting

        return get_setting("NESTED_POLICY") == "fan_out" or bool(get_setting("FAN_OUT"))
    except Exception:
        return False


def launch(
    identity: TaskIdentity,
    func: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    enqueue: Any,
    powercrud_launch: bool,
) -> Any:
    """Enqueue ``func`` as a child job of ``identity``'s job; returns django-q2's task id."""
    from django_q import tasks as q_tasks
    from django_q.conf import Conf

    from otel_taskctx.descendants import register_for
    from otel_taskctx.models import FanOutChild

    label = utils.func_path(func)
    if kwargs.get("sync") or Conf.SYNC:
        raise FanOutUnavailable(
            f"cannot fan out {label} from task {identity.task_key}: the broker runs tasks "
            "synchronously (Q_CLUSTER['sync'] or sync=True), so no other worker can run it "
            "and the job could not wait for it. Fix: turn sync off, or remove the function "
            "from OTEL_TASKCTX['FAN_OUT'] / set NESTED_POLICY to 'inline'."
        )
    conflict_ids = kwargs.get("conflict_ids") if powercrud_launch else None
    if conflict_ids:
        register_for(identity, conflict_ids)  # all-or-nothing, before anything is enqueued
    drop = utils.LAUNCH_OPTION_KEYS if powercrud_launch else ("hook", "sync")
    call_kwargs = {k: v for k, v in kwargs.items() if k not in drop}
    if powercrud_launch or "task_key" in call_kwargs:
        call_kwargs["task_key"] = identity.task_key
    from django.db import connection, transaction

    def enqueue_child() -> Any:
        # the child's django-q2 task name is chosen here, so its barrier row is written once,
        # before the enqueue (the child may end before the enqueue returns)
        name = f"fan-out-{uuid.uuid4().hex}"
        row = FanOutChild.objects.create(job_key=identity.task_key, task_id=name, func=label[:255])
        child = identity.child(identity.task_key, identity.manager_class_path)
        original = getattr(q_tasks.async_task, "__wrapped__", q_tasks.async_task)
        options = {**call_kwargs, "hook": CHILD_HOOK, "task_name": name}
        token = context.attach(context_with_identity(child))
        try:
            return enqueue(original, func, args, options, fan_out=child)
        except BaseException:
            row.delete()
            raise
        finally:
            context.detach(token)

    if connection.in_atomic_block:
        # the child must see what the job committed: it is enqueued when the job's
        # transaction commits (and never, if it rolls back)
        transaction.on_commit(enqueue_child)
        return f"{identity.task_key}/fan-out/on-commit"
    return enqueue_child()


def _failure(task: Any) -> str:
    if not task.success:
        text = str(task.result or "").strip().splitlines()
        return text[-1] if text else "the child failed"
    if task.result is False:
        return "the child returned False"
    return ""


#: seconds between two sweeps of one process from its completion hooks
SWEEP_INTERVAL = 10.0
_last_sweep = 0.0


def sweep(force: bool = True) -> int:
    """Fail children with no result after ``FAN_OUT_TIMEOUT`` seconds and complete their jobs.
    Returns the number of children failed. ``force=False`` (the completion hooks) sweeps at
    most once every :data:`SWEEP_INTERVAL` seconds per process."""
    import time
    from datetime import timedelta

    global _last_sweep
    now = time.monotonic()
    if not force and now - _last_sweep < SWEEP_INTERVAL:
        return 0
    _last_sweep = now

    from django.utils import timezone

    from otel_taskctx.conf import get_setting
    from otel_taskctx.models import FanOutChild

    timeout = float(get_setting("FAN_OUT_TIMEOUT") or 0)
    if timeout <= 0:
        return 0
    stale = FanOutChild.objects.filter(
        state=FanOutChild.State.PENDING, created_at__lt=timezone.now() - timedelta(seconds=timeout)
    ).exclude(task_id=JOB_ROW)
    jobs = set(stale.values_list("job_key", flat=True))
    if not jobs:
        return 0
    failed = stale.update(
        state=FanOutChild.State.FAILED,
        finished_at=timezone.now(),
        error=f"no result within FAN_OUT_TIMEOUT ({timeout:g} s): its worker was killed or "
        "lost, and the broker did not deliver it again",
    )
    for job_key in jobs:
        _maybe_complete(job_key)
    return failed


def swept_cleanup(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """wrapt wrapper of powercrud's ``cleanup_completed_tasks``: sweep fan-out jobs first."""
    if configured():
        try:
            sweep()
        except Exception:
            log.warning("could not sweep fan-out jobs", exc_info=True)
    return wrapped(*args, **kwargs)


def child_done(task: Any) -> None:
    """django-q2 hook of a child job (in the cluster's monitor): record it, maybe end the job."""
    from django.utils import timezone

    from otel_taskctx.models import FanOutChild

    rows = FanOutChild.objects.filter(task_id=str(task.name))
    job_key = rows.values_list("job_key", flat=True).first()
    if job_key is None:
        log.warning("fan-out child %s (%s) has no barrier row", task.name, task.func)
        return
    error = _failure(task)
    state = FanOutChild.State.FAILED if error else FanOutChild.State.DONE
    rows.update(state=state, error=error[:4000], finished_at=timezone.now())
    _maybe_complete(job_key)
    sweep(force=False)


def deferred_completion(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """wrapt wrapper of powercrud's ``task_completion_hook(task)``: deferred while children of
    the job are pending."""
    task = args[0] if args else kwargs.get("task")
    if task is None or not configured():
        return wrapped(*args, **kwargs)
    from otel_taskctx.models import FanOutChild

    job_key = str(task.name)
    children = FanOutChild.objects.filter(job_key=job_key).exclude(task_id=JOB_ROW)
    if not children.exists():
        return wrapped(*args, **kwargs)
    FanOutChild.objects.get_or_create(
        job_key=job_key,
        task_id=JOB_ROW,
        defaults={"state": FanOutChild.State.PENDING, "func": str(task.func)[:255]},
    )
    sweep(force=False)
    return _maybe_complete(job_key)


def _maybe_complete(job_key: str) -> Any:
    """Run powercrud's completion of ``job_key`` if its function ended and no child is
    pending (once: the job's row turns from pending to done)."""
    from django.db import transaction
    from django_q.models import Task
    from powercrud import async_hooks

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
        failed = [r for r in children if r.state == FanOutChild.State.FAILED]
        # the job is complete: its barrier rows are not needed any more
        FanOutChild.objects.filter(job_key=job_key).delete()
    if failed:
        first = failed[0]
        message = f"fan-out child {first.func} (task {first.task_id}) failed: {first.error}" + (
            f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        )
        Task.objects.filter(name=job_key).update(success=False, result=message)
    task = Task.objects.filter(name=job_key).order_by("-stopped").first()
    if task is None:  # pragma: no cover - the job's row is written before its hook runs
        log.warning("fan-out job %s has no Task row: its completion cannot run", job_key)
        return None
    original = getattr(async_hooks.task_completion_hook, "__wrapped__", None)
    return (original or async_hooks.task_completion_hook)(task)
