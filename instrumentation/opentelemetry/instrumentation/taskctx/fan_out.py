"""django-q2 fan-out: a nested launch runs as a child job, the job completes after its last
child (docs/fan_out.md). ``child_done`` / ``job_done`` are hooks stored in ``Task`` rows.
"""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry import context
from opentelemetry.instrumentation.taskctx import barrier

from otel_taskctx.context import context_with_identity
from otel_taskctx.errors import FanOutUnavailable
from otel_taskctx.identity import TaskIdentity
from otel_taskctx.policy import func_path

log = logging.getLogger("otel_taskctx.instrumentation")

CHILD_HOOK = f"{__name__}.child_done"
JOB_HOOK = f"{__name__}.job_done"
POWERCRUD_HOOK = "powercrud.async_hooks.task_completion_hook"


def launch(
    identity: TaskIdentity,
    func: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    enqueue: Any,
    conflict_ids: Any = None,
    sync: bool = False,
) -> Any:
    """Enqueue ``func`` as a child job of ``identity``'s job (its locks reserved first, its
    barrier record written before the enqueue, on commit inside a transaction)."""
    from django.db import connection, transaction
    from django_q import tasks as q_tasks
    from django_q.conf import Conf

    from otel_taskctx.descendants import register_for

    label = func_path(func)
    if sync or Conf.SYNC:
        raise FanOutUnavailable(
            f"cannot fan out {label} from task {identity.task_key}: the broker runs tasks "
            "synchronously (Q_CLUSTER['sync'] or sync=True), so no other worker can run it "
            "and the job could not wait for it. Fix: turn sync off, or remove the function "
            "from OTEL_TASKCTX['FAN_OUT'] / set NESTED_POLICY to 'inline'."
        )
    if conflict_ids:
        register_for(identity, conflict_ids)  # all-or-nothing, before anything is enqueued

    def enqueue_child() -> Any:
        with barrier.new_child(identity, label) as (name, child):
            original = getattr(q_tasks.async_task, "__wrapped__", q_tasks.async_task)
            options = {**kwargs, "hook": CHILD_HOOK, "task_name": name}
            token = context.attach(context_with_identity(child))
            try:
                return enqueue(original, func, args, options, child)
            finally:
                context.detach(token)

    if connection.in_atomic_block:  # the child must see what the job commits
        transaction.on_commit(enqueue_child)
        return f"{identity.task_key}/fan-out/on-commit"
    return enqueue_child()


def swept_cleanup(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """wrapt wrapper of powercrud's ``cleanup_completed_tasks``: sweep fan-out jobs first."""
    try:
        barrier.sweep()
    except Exception:
        log.warning("could not sweep fan-out jobs", exc_info=True)
    return wrapped(*args, **kwargs)


def child_done(task: Any) -> None:
    """django-q2 hook of a child job (in the cluster's monitor): record it, maybe end the job."""
    error = ""
    if not task.success:
        lines = str(task.result or "").strip().splitlines()
        error = lines[-1] if lines else "the child failed"
    elif task.result is False:
        error = "the child returned False"
    barrier.child_ended(str(task.name), error, str(task.func))


def defer_completion(task: dict[str, Any], identity: TaskIdentity | None) -> None:
    """``post_execute_in_worker``: a job that fanned out from this process gets
    :data:`JOB_HOOK` in place of powercrud's hook (the package's documented option)."""
    if identity is None or identity.task_key not in barrier.launched:
        return
    barrier.launched.discard(identity.task_key)
    if task.get("hook") == POWERCRUD_HOOK and str(task.get("name")) == identity.task_key:
        task["hook"] = JOB_HOOK


def job_done(task: Any) -> None:
    """django-q2 hook of a job that fanned out: powercrud's completion runs when its last
    child has ended (now, if none is pending)."""
    if not barrier.job_ended(str(task.name), str(task.func)):
        from powercrud import async_hooks

        async_hooks.task_completion_hook(task)
