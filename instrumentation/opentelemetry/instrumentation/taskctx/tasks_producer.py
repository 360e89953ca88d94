"""``django.tasks``' enqueue side: ``Task.enqueue`` wrapped, ``task_enqueued`` keeps the
carrier beside the task (see docs/django_tasks.md).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace
from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.taskctx import barrier, runs, tasks_carriers
from opentelemetry.instrumentation.taskctx.tracing import STATE, messaging_attributes

from otel_taskctx import policy, semconv
from otel_taskctx.context import context_with_identity, context_without_identity, current_task
from otel_taskctx.errors import FanOutUnavailable
from otel_taskctx.identity import TaskIdentity
from otel_taskctx.propagation import inject

log = logging.getLogger("otel_taskctx.instrumentation")

#: the keyword argument earlier versions carried the context in: now a plain argument
CARRIER_KWARG = "_otel_taskctx"
#: the carrier's entry naming a fanned-out child's barrier record
FAN_OUT_FIELD = "fan_out"
MESSAGING_SYSTEM_VALUE = "django_tasks"


def attributes_of(task: Any, operation: str) -> dict[str, Any]:
    attributes = messaging_attributes(MESSAGING_SYSTEM_VALUE, operation, task.module_path)
    attributes[semconv.MESSAGING_DESTINATION_NAME] = str(task.queue_name or "")
    return attributes


def _hand_carrier(task: Any) -> None:
    log.warning(
        "task %s was enqueued with a %s keyword argument: a task identity is never taken from "
        "a task's arguments (only otel_taskctx writes identities, beside the task), so it is "
        "enqueued as a plain task and the argument is passed to it as it is",
        task.module_path,
        CARRIER_KWARG,
    )


def traced_enqueue(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """wrapt wrapper of ``django.tasks.Task.enqueue(*args, **kwargs)``."""
    if not STATE.active:
        return wrapped(*args, **kwargs)
    if CARRIER_KWARG in kwargs:
        _hand_carrier(instance)
        return wrapped(*args, **kwargs)
    identity = current_task()
    how = policy.nested_launch(identity, instance.func)
    if how == policy.FAN_OUT:
        return _enqueue_child(identity, instance, args, kwargs)
    if how == policy.INLINE:
        return _run_nested(identity, instance, args, kwargs)
    plan = runs.Plan(_start_send(instance), task=instance)
    return _send(plan, lambda: wrapped(*args, **kwargs))


def traced_aenqueue(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """wrapt wrapper of ``Task.aenqueue``: a root task without a carrier row is awaited under
    its span; anything else is the instrumented ``enqueue``, in a thread."""
    if not STATE.active:
        return wrapped(*args, **kwargs)
    nested = policy.nested_launch(current_task(), instance.func) != policy.ENQUEUE
    if nested or CARRIER_KWARG in kwargs or tasks_carriers.carries_roots(instance.get_backend()):
        from asgiref.sync import sync_to_async

        return sync_to_async(instance.enqueue, thread_sensitive=True)(*args, **kwargs)
    return _aenqueue_root(wrapped, instance, args, kwargs)


async def _aenqueue_root(wrapped: Any, task: Any, args: tuple, kwargs: dict) -> Any:
    with runs.sending(runs.Plan(_start_send(task), task=task)):
        return await wrapped(*args, **kwargs)


def _send(plan: runs.Plan, enqueue: Any) -> Any:
    """Run ``enqueue()`` under ``plan``'s span (in one transaction with the carrier's row
    where one is written)."""
    backend = plan.task.get_backend()
    written = plan.child is not None or tasks_carriers.carries_roots(backend)
    with (
        runs.sending(plan),
        tasks_carriers.atomic_for(backend) if written else contextlib.nullcontext(),
    ):
        return enqueue()


def on_task_enqueued(sender: Any = None, task_result: Any = None, **kwargs: Any) -> None:
    """``task_enqueued``: a fanned-out child's identity is bound to its result id and its
    carrier kept beside the task (in the enqueue's transaction); a root task's carrier holds
    its trace context only."""
    plan = runs.plan()
    if plan is None or plan.task is None or plan.done or task_result is None:
        return
    if getattr(task_result.task, "func", None) is not plan.task.func:
        return
    plan.done = True
    result_id = str(task_result.id)
    backend = task_result.task.get_backend()
    key = f"task-{result_id}"
    try:
        # an in-process run (ImmediateBackend) starts in this very context: nothing to keep
        if plan.child is not None or tasks_carriers.carries_roots(backend):
            ctx = trace.set_span_in_context(plan.span)
            carrier: dict[str, str] = {}
            if plan.child is not None:
                identity = replace(plan.child, bound_to=result_id)
                key = identity.task_key
                inject(carrier, context_with_identity(identity, ctx=ctx))
                carrier[FAN_OUT_FIELD] = plan.fan_out
            else:
                inject(carrier, context_without_identity(ctx))
            with tasks_carriers.atomic_for(backend):  # a savepoint
                tasks_carriers.store(task_result, carrier, plan.fan_out)
    except Exception:  # the enqueue goes on: a child then runs as a plain task
        log.exception("could not keep the task context of task %s", result_id)
    if plan.span.is_recording():
        plan.span.set_attribute(semconv.MESSAGING_MESSAGE_ID, result_id)
        plan.span.set_attribute(semconv.LAUNCHED_TASK_KEY, key)


def _start_send(task: Any, child: TaskIdentity | None = None) -> trace.Span:
    """The PRODUCER span of a task being sent (``child``: a fanned-out child's identity)."""
    attributes = {semconv.MESSAGING_DESTINATION_NAME: str(task.queue_name or "")}
    if child is not None:
        attributes.update(child.lineage_attributes())
        attributes[semconv.NESTED_MODE] = "fan_out"
    return runs.send_span(MESSAGING_SYSTEM_VALUE, task.module_path, attributes)


def _refuse_fan_out(identity: TaskIdentity, task: Any) -> None:
    """A backend that cannot run the child elsewhere, while the job waits for it, refuses."""
    from django.tasks.backends.dummy import DummyBackend
    from django.tasks.backends.immediate import ImmediateBackend

    backend = task.get_backend()
    if isinstance(backend, ImmediateBackend | DummyBackend):
        raise FanOutUnavailable(
            f"cannot fan out {task.module_path} from task {identity.task_key}: its backend "
            f"{task.backend!r} is {type(backend).__name__}, which runs tasks "
            f"{'in the caller' if isinstance(backend, ImmediateBackend) else 'never'}, so no "
            "worker can run the child while the job waits for it. Fix: use a backend with a "
            "worker (django_tasks_db.DatabaseBackend and manage.py db_worker), or let it run "
            "inline (@run_inline, or leave it out of OTEL_TASKCTX['FAN_OUT'])."
        )


def _enqueue_child(identity: TaskIdentity, task: Any, args: tuple, kwargs: dict) -> Any:
    """Enqueue a nested task as a fanned-out child of ``identity``'s job (its row and carrier
    in one transaction, the caller's if any); its ``TaskResult``."""
    _refuse_fan_out(identity, task)
    with barrier.new_child(identity, task.module_path) as (name, child):
        plan = runs.Plan(_start_send(task, child), child, name, task=task)
        return _send(plan, lambda: task.get_backend().enqueue(task, args, kwargs))


def _run_nested(identity: TaskIdentity, task: Any, args: tuple, kwargs: dict) -> Any:
    """Run a nested task now, under the parent's key; a finished ``TaskResult`` for it."""
    from django.tasks.base import TaskContext, TaskResult, TaskResultStatus
    from django.utils import timezone

    started = timezone.now()
    running = TaskResult(
        task=task,
        id="",
        status=TaskResultStatus.RUNNING,
        enqueued_at=started,
        started_at=started,
        finished_at=None,
        last_attempted_at=started,
        args=list(args),
        kwargs=dict(kwargs),
        backend=task.backend,
        errors=[],
        worker_ids=[],
    )
    call_args = (TaskContext(task_result=running), *args) if task.takes_context else args
    returned: list[Any] = []

    def body(*a: Any, **kw: Any) -> None:
        returned.append(task.call(*a, **kw))

    step_id = runs.run_inline(identity, body, call_args, kwargs, label=task.module_path)
    done = TaskResultStatus.SUCCESSFUL
    result = replace(running, id=step_id, status=done, finished_at=timezone.now())
    # the one field TaskResult's constructor does not take (Django's backends set it so too)
    object.__setattr__(result, "_return_value", returned[0] if returned else None)
    return result
