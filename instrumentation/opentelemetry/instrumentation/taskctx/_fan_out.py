"""Fan-out: a nested launch inside a job runs as a real job on another worker, and the job
ends (powercrud's completion: status, lock release, progress end, dashboard) only when the
last of them has.

* Chosen per function (``@fan_out`` / ``@run_inline``, :mod:`otel_taskctx.policy`) or by
  settings: ``OTEL_TASKCTX["NESTED_POLICY"] = "fan_out"`` for every nested launch, or
  ``OTEL_TASKCTX["FAN_OUT"]`` listing the functions that fan out (inline stays the default).
* :func:`launch` (inside a job): the child's descendant locks (``conflict_ids``) are reserved
  under the job's key first, all-or-nothing; a pending row goes into the barrier
  (:mod:`._barrier`); then the child is enqueued (inside a database transaction: when it
  commits, so the child sees what the job wrote) with an identity that keeps the job's key
  (depth + 1), so its own locks, progress and fan-outs count against the same job. Its
  completion hook is :func:`child_done`.
* A job that fanned out gets :func:`job_done` as its hook in place of powercrud's
  ``task_completion_hook``, set by its worker as the job's function ends
  (:func:`defer_completion`): its end is recorded, and powercrud's completion runs when no
  child is pending, by the last child's :func:`child_done` (:func:`complete`). A job that
  fanned nothing out keeps powercrud's hook and costs the barrier nothing. No worker waits, so a 1-worker cluster cannot deadlock.
* A failed child (an exception, or ``False`` returned) fails the job: its Task row gets
  ``success=False`` and a result naming the child, its exception and message. Siblings keep
  running; the job ends when all have.
* A worker killed under a child: the ORM broker redelivers the child after
  ``Q_CLUSTER["retry"]`` seconds and the job waits for it. A child without a result after
  ``OTEL_TASKCTX["FAN_OUT_TIMEOUT"]`` seconds (the Redis broker does not redeliver) is failed
  by :func:`._barrier.sweep`, which fails its job and runs the job's completion (locks
  released). The processes that launch, run or wait for children sweep by themselves
  (:mod:`.sweeper`: the worker that launched them, the workers that run them, the cluster's
  monitor while the job waits), and so does powercrud's cleanup (``pcrud_cleanup_async``,
  which powercrud can schedule), whose ``cleanup_completed_tasks`` is wrapped.
"""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry import context
from opentelemetry.instrumentation.taskctx import _barrier, sweeper, utils

from otel_taskctx.context import context_with_identity
from otel_taskctx.errors import FanOutUnavailable
from otel_taskctx.identity import TaskIdentity

log = logging.getLogger("otel_taskctx.instrumentation")

CHILD_HOOK = f"{__name__}.child_done"
#: the hook of a job that fanned out (:func:`job_done`); both names are stored in Task rows
JOB_HOOK = f"{__name__}.job_done"
POWERCRUD_HOOK = "powercrud.async_hooks.task_completion_hook"


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
        name = _barrier.child_name(identity.task_key)
        _barrier.add_child(identity.task_key, name, label)
        child = identity.child(identity.task_key, identity.manager_class_path)
        original = getattr(q_tasks.async_task, "__wrapped__", q_tasks.async_task)
        options = {**call_kwargs, "hook": CHILD_HOOK, "task_name": name}
        token = context.attach(context_with_identity(child))
        try:
            task_id = enqueue(original, func, args, options, fan_out=child)
        except BaseException:
            _barrier.remove_child(identity.task_key, name)
            raise
        finally:
            context.detach(token)
        sweeper.ensure_running()
        return task_id

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


def swept_cleanup(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """wrapt wrapper of powercrud's ``cleanup_completed_tasks``: sweep fan-out jobs first."""
    try:
        _barrier.sweep()
    except Exception:
        log.warning("could not sweep fan-out jobs", exc_info=True)
    return wrapped(*args, **kwargs)


def child_done(task: Any) -> None:
    """django-q2 hook of a child job (in the cluster's monitor): record it, maybe end the job."""
    _barrier.child_ended(str(task.name), _failure(task), str(task.func))


def defer_completion(task: dict[str, Any], identity: TaskIdentity | None) -> None:
    """In the worker, as a job's function ends (``post_execute_in_worker``): a job that
    launched fanned-out children from this process gets :data:`JOB_HOOK` in place of
    powercrud's completion hook, so that only such a job asks the barrier anything."""
    if identity is None or not _barrier.launched_here(identity.task_key):
        return
    _barrier.forget_launched(identity.task_key)
    if task.get("hook") == POWERCRUD_HOOK and str(task.get("name")) == identity.task_key:
        task["hook"] = JOB_HOOK  # the package's documented hook option, before it is saved


def job_done(task: Any) -> None:
    """django-q2 hook (in the cluster's monitor) of a job that fanned out: powercrud's
    completion runs when its last child has ended (now, if none is pending)."""
    try:
        deferred = _barrier.job_ended(str(task.name), str(task.func))
    except Exception:  # the barrier is unreachable: powercrud's completion still runs
        log.warning("could not check the fan-out children of job %s", task.name, exc_info=True)
        deferred = False
    if deferred:  # the monitor lives as long as the cluster: it sweeps while the job waits
        sweeper.ensure_running()
        return
    from powercrud import async_hooks

    async_hooks.task_completion_hook(task)


def complete(job_key: str, job: Any, failed: list[Any]) -> Any:
    """powercrud's completion of a fanned-out job, once its last child has ended."""
    from django_q.models import Task
    from powercrud import async_hooks

    if failed:
        Task.objects.filter(name=job_key).update(
            success=False, result=_barrier.failure_message(failed)
        )
    task = Task.objects.filter(name=job_key).order_by("-stopped").first()
    if task is None:  # pragma: no cover - the job's row is written before its hook runs
        log.warning("fan-out job %s has no Task row: its completion cannot run", job_key)
        return None
    return async_hooks.task_completion_hook(task)


_barrier.register_completion(_barrier.DJANGO_Q, complete)
