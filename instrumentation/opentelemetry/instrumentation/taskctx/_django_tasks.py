"""Django's task framework (``django.tasks``), the enqueue side: the same task context as on
django-q2 (the worker side is :mod:`._tasks_worker`).

* **Enqueue outside a task** (``Task.enqueue``, wrapped for the PRODUCER span and the
  decision below): a root task. Nothing of its identity travels: its worker derives it from
  the task's own result id (key ``task-<result id>``, manager
  :class:`otel_taskctx.task_manager.TaskManager`), so there is nothing to copy or forge, and
  the enqueue costs no statement. Its trace context reaches a ``db_worker`` only where
  ``OTEL_TASKCTX["DJANGO_TASKS_TRACE_CONTEXT"]`` is on (a carrier row beside the task, written
  in the task row's transaction; an in-process backend gets it in memory). The task's
  arguments are never touched (:mod:`.tasks_carriers`).
* **Enqueue inside a task**: by default the nested task runs inline, under the parent's key,
  as nested django-q2 launches do (``ENQUEUE_NESTED`` and ``allow_nested_async()`` opt out);
  the call returns a finished ``TaskResult``. An exception propagates to the parent, so the
  parent fails with it.
* **Fan-out** (``@fan_out``, ``OTEL_TASKCTX["FAN_OUT"]`` or ``NESTED_POLICY="fan_out"``): the
  nested task is enqueued as a real child task whose identity keeps the job's key (depth + 1),
  is **bound to the child's own result id** (a worker accepts it for that task only), and whose
  carrier, kept beside the task in the transaction that writes its row, names its record in
  the fan-out barrier (:mod:`._barrier`); the parent task ends only when its last descendant has (see
  :mod:`._tasks_worker`). A backend that runs tasks in the caller (``ImmediateBackend``) or
  never (``DummyBackend``) refuses it (:class:`~otel_taskctx.errors.FanOutUnavailable`).
* A ``_otel_taskctx`` keyword argument passed by the caller is the caller's argument, not an
  identity: the task is enqueued as a plain task, with a warning.
"""

from __future__ import annotations

import contextlib
import logging
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.taskctx import _barrier, _nested, sweeper, tasks_carriers, utils
from opentelemetry.trace import SpanKind

from otel_taskctx import policy, semconv
from otel_taskctx.context import context_with_identity, context_without_identity, current_task
from otel_taskctx.errors import FanOutUnavailable
from otel_taskctx.identity import TaskIdentity
from otel_taskctx.propagation import inject

log = logging.getLogger("otel_taskctx.instrumentation")

#: the keyword argument name that earlier versions carried the context in: passed by a
#: caller, it is a plain argument (and a warning)
CARRIER_KWARG = "_otel_taskctx"
#: the carrier's entry naming a fanned-out child's barrier record
FAN_OUT_FIELD = "fan_out"
MESSAGING_SYSTEM_VALUE = "django_tasks"


def attributes_of(task: Any, operation: str) -> dict[str, Any]:
    return {
        semconv.MESSAGING_SYSTEM: MESSAGING_SYSTEM_VALUE,
        semconv.MESSAGING_OPERATION_TYPE: operation,
        semconv.MESSAGING_OPERATION_NAME: operation,
        semconv.MESSAGING_DESTINATION_NAME: str(getattr(task, "queue_name", "") or ""),
        semconv.TASK_FUNC: str(getattr(task, "module_path", "")),
    }


@dataclass(slots=True, eq=False)
class _Plan:
    """An instrumented enqueue in progress, for the ``task_enqueued`` receiver."""

    task: Any
    span: trace.Span
    #: the identity of a fanned-out child (``bound_to`` is set from its result); None: a root
    child: TaskIdentity | None = None
    #: the child's barrier record ("" for a root)
    fan_out: str = ""
    done: bool = False


_plan: ContextVar[_Plan | None] = ContextVar("otel_taskctx.tasks-enqueue", default=None)


# --------------------------------------------------------------------------- enqueue


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
    if not utils.STATE.active:
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
    plan = _Plan(instance, _start_send(instance))
    return _send(plan, lambda: wrapped(*args, **kwargs))


def traced_aenqueue(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """wrapt wrapper of ``Task.aenqueue``: the same as :func:`traced_enqueue`, awaited."""
    if not utils.STATE.active:
        return wrapped(*args, **kwargs)
    from asgiref.sync import sync_to_async

    if CARRIER_KWARG in kwargs:
        _hand_carrier(instance)
        return wrapped(*args, **kwargs)
    identity = current_task()
    how = policy.nested_launch(identity, instance.func)
    if how != policy.ENQUEUE:
        run = _enqueue_child if how == policy.FAN_OUT else _run_nested
        return sync_to_async(run, thread_sensitive=True)(identity, instance, args, kwargs)
    if tasks_carriers.carries_roots(instance.get_backend()):
        # the row and its carrier in one transaction: the synchronous enqueue, in a thread
        return sync_to_async(instance.enqueue, thread_sensitive=True)(*args, **kwargs)
    return _aenqueue_root(wrapped, instance, args, kwargs)


async def _aenqueue_root(wrapped: Any, task: Any, args: tuple, kwargs: dict) -> Any:
    plan = _Plan(task, _start_send(task))
    token = _plan.set(plan)
    try:
        with utils.running_in(plan.span, trace.set_span_in_context(plan.span)):
            return await wrapped(*args, **kwargs)
    finally:
        _plan.reset(token)


def _send(plan: _Plan, enqueue: Any) -> Any:
    """Run ``enqueue()`` under ``plan``'s span (in one transaction with the carrier's row
    where one is written)."""
    token = _plan.set(plan)
    backend = plan.task.get_backend()
    written = plan.child is not None or tasks_carriers.carries_roots(backend)
    try:
        with (
            utils.running_in(plan.span, trace.set_span_in_context(plan.span)),
            tasks_carriers.atomic_for(backend) if written else contextlib.nullcontext(),
        ):
            return enqueue()
    finally:
        _plan.reset(token)


def on_task_enqueued(sender: Any = None, task_result: Any = None, **kwargs: Any) -> None:
    """``task_enqueued``: the result of an instrumented enqueue exists. A fanned-out child's
    identity is bound to its id and its carrier kept beside the task (in the enqueue's
    transaction); a root task needs no identity to travel (its worker derives it from the
    result id), only its trace context where the deployment carries it."""
    plan = _plan.get()
    if plan is None or plan.done or task_result is None:
        return
    if getattr(task_result.task, "func", None) is not plan.task.func:
        return
    plan.done = True
    result_id = str(task_result.id)
    backend = task_result.task.get_backend()
    key = f"task-{result_id}"
    try:
        ctx = trace.set_span_in_context(plan.span)
        carrier: dict[str, str] = {}
        if plan.child is not None:
            identity = replace(plan.child, bound_to=result_id)
            key = identity.task_key
            inject(carrier, context_with_identity(identity, ctx=ctx))
            carrier[FAN_OUT_FIELD] = plan.fan_out
        else:
            inject(carrier, context_without_identity(ctx))
        if plan.child is not None or tasks_carriers.carries_roots(backend):
            with tasks_carriers.atomic_for(backend):  # a savepoint
                tasks_carriers.store(task_result, carrier, plan.fan_out)
        else:
            tasks_carriers.hand_over(task_result, carrier)  # in-process runs only: no query
    except Exception:  # the enqueue goes on: a child then runs as a plain task
        log.exception("could not keep the task context of task %s", result_id)
    if plan.span.is_recording():
        plan.span.set_attribute(semconv.MESSAGING_MESSAGE_ID, result_id)
        plan.span.set_attribute(semconv.LAUNCHED_TASK_KEY, key)


def _start_send(task: Any, child: TaskIdentity | None = None) -> trace.Span:
    """The PRODUCER span of a task being sent (``child``: a fanned-out child's identity)."""
    attributes = attributes_of(task, "send")
    if child is not None:
        attributes.update(child.lineage_attributes())
        attributes[semconv.NESTED_MODE] = "fan_out"
    return utils.STATE.tracer.start_span(
        f"send {task.module_path}", kind=SpanKind.PRODUCER, attributes=attributes
    )


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
    """Enqueue a nested task as a fanned-out child of ``identity``'s job; its ``TaskResult``.

    With django_tasks_db's backend the child's row and its carrier are written in one
    transaction (and in the caller's: a child enqueued inside ``transaction.atomic()`` runs
    after the commit, and never if it rolls back).
    """
    _refuse_fan_out(identity, task)
    name = _barrier.child_name(identity.task_key)
    _barrier.add_child(identity.task_key, name, task.module_path)
    child = identity.child(identity.task_key, identity.manager_class_path)
    try:
        plan = _Plan(task, _start_send(task, child), child, name)
        result = _send(plan, lambda: task.get_backend().enqueue(task, args, kwargs))
    except BaseException:
        _barrier.remove_child(identity.task_key, name)
        raise
    sweeper.ensure_running()
    return result


def _run_nested(identity: TaskIdentity, task: Any, args: tuple, kwargs: dict) -> Any:
    """Run a nested task now, under the parent's key; a finished ``TaskResult`` for it."""
    from django.tasks.base import TaskContext, TaskResult, TaskResultStatus
    from django.utils import timezone

    started = timezone.now()
    result = TaskResult(
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
    call_args = (TaskContext(task_result=result), *args) if task.takes_context else args
    returned: list[Any] = []

    def body(*a: Any, **kw: Any) -> None:
        returned.append(task.call(*a, **kw))

    step_id = _nested.run_inline(identity, body, call_args, kwargs, label=task.module_path)
    object.__setattr__(result, "id", step_id)
    object.__setattr__(result, "status", TaskResultStatus.SUCCESSFUL)
    object.__setattr__(result, "finished_at", timezone.now())
    object.__setattr__(result, "_return_value", returned[0] if returned else None)
    return result
