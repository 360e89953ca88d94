"""Django's task framework (``django.tasks``), the enqueue side: the same task context as on
django-q2 (the worker side is :mod:`._tasks_worker`).

* **Enqueue outside a task** (``Task.enqueue``, patched: the framework has no seam that can
  change a task's arguments): a root task. It gets a fresh task key and a signed identity that
  names :class:`otel_taskctx.task_manager.TaskManager`; the identity and the trace context go
  into a reserved keyword argument of the task (:data:`CARRIER_KWARG`), under a PRODUCER span.
* **Enqueue inside a task**: by default the nested task runs inline, under the parent's key,
  as nested django-q2 launches do (``ENQUEUE_NESTED`` and ``allow_nested_async()`` opt out);
  the call returns a finished ``TaskResult``. An exception propagates to the parent, so the
  parent fails with it.
* **Fan-out** (``@fan_out``, ``OTEL_TASKCTX["FAN_OUT"]`` or ``NESTED_POLICY="fan_out"``): the
  nested task is enqueued as a real child task with an identity that keeps the job's key
  (depth + 1) and the name of its row in the fan-out barrier (:mod:`._barrier`); the parent
  task ends only when its last descendant has (see :mod:`._tasks_worker`). A backend that runs
  tasks in the caller (``ImmediateBackend``) or never (``DummyBackend``) refuses it
  (:class:`~otel_taskctx.errors.FanOutUnavailable`).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.taskctx import _barrier, _nested, utils
from opentelemetry.trace import SpanKind

from otel_taskctx import semconv
from otel_taskctx.context import context_with_identity, current_task
from otel_taskctx.errors import FanOutUnavailable
from otel_taskctx.identity import TaskIdentity
from otel_taskctx.propagation import inject
from otel_taskctx.task_manager import TASK_MANAGER_PATH

log = logging.getLogger("otel_taskctx.instrumentation")

#: the keyword argument that carries the trace context and identity to the worker
CARRIER_KWARG = "_otel_taskctx"
#: the carrier's entry naming a fanned-out child's barrier row
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


# --------------------------------------------------------------------------- enqueue


def traced_enqueue(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """wrapt wrapper of ``django.tasks.Task.enqueue(*args, **kwargs)``."""
    if not utils.STATE.active or CARRIER_KWARG in kwargs:
        return wrapped(*args, **kwargs)
    identity = current_task()
    if _nested.should_run_inline(identity, instance.func):
        if _barrier.wanted(instance.func):
            return _enqueue_child(identity, instance, args, kwargs)
        return _run_nested(identity, instance, args, kwargs)
    span, carrier = _start_send(
        instance, TaskIdentity(f"task-{uuid.uuid4().hex}", TASK_MANAGER_PATH)
    )
    with utils.running_in(span, trace.set_span_in_context(span)):
        result = wrapped(*args, **{**kwargs, CARRIER_KWARG: carrier})
        if span.is_recording():
            span.set_attribute(semconv.MESSAGING_MESSAGE_ID, str(result.id))
        return result


def traced_aenqueue(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """wrapt wrapper of ``Task.aenqueue``: the same as :func:`traced_enqueue`, awaited."""
    if not utils.STATE.active or CARRIER_KWARG in kwargs:
        return wrapped(*args, **kwargs)
    identity = current_task()
    if _nested.should_run_inline(identity, instance.func):
        from asgiref.sync import sync_to_async

        run = _enqueue_child if _barrier.wanted(instance.func) else _run_nested
        return sync_to_async(run, thread_sensitive=True)(identity, instance, args, kwargs)
    return _aenqueue_root(wrapped, instance, args, kwargs)


async def _aenqueue_root(wrapped: Any, task: Any, args: tuple, kwargs: dict) -> Any:
    span, carrier = _start_send(task, TaskIdentity(f"task-{uuid.uuid4().hex}", TASK_MANAGER_PATH))
    with utils.running_in(span, trace.set_span_in_context(span)):
        result = await wrapped(*args, **{**kwargs, CARRIER_KWARG: carrier})
        if span.is_recording():
            span.set_attribute(semconv.MESSAGING_MESSAGE_ID, str(result.id))
        return result


def _start_send(
    task: Any, identity: TaskIdentity, fan_out: str | None = None
) -> tuple[trace.Span, dict[str, str]]:
    """The PRODUCER span of a task sent with ``identity`` and the carrier of the identity."""
    attributes = attributes_of(task, "send")
    attributes[semconv.LAUNCHED_TASK_KEY] = identity.task_key
    if fan_out is not None:
        attributes.update(identity.lineage_attributes())
        attributes[semconv.NESTED_MODE] = "fan_out"
    span = utils.STATE.tracer.start_span(
        f"send {task.module_path}", kind=SpanKind.PRODUCER, attributes=attributes
    )
    carrier: dict[str, str] = {}
    inject(carrier, context=context_with_identity(identity, ctx=trace.set_span_in_context(span)))
    if fan_out is not None:
        carrier[FAN_OUT_FIELD] = fan_out
    return span, carrier


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

    With django_tasks_db's backend the child's row and its barrier row are written in the
    caller's transaction: a child enqueued inside ``transaction.atomic()`` runs after the
    commit, and never if it rolls back.
    """
    _refuse_fan_out(identity, task)
    name = _barrier.child_name(identity.task_key)
    _barrier.add_child(identity.task_key, name, task.module_path)
    child = identity.child(identity.task_key, identity.manager_class_path)
    try:
        span, carrier = _start_send(task, child, fan_out=name)
        with utils.running_in(span, trace.set_span_in_context(span)):
            # the carrier makes the wrapper pass this call through to the backend
            result = task.enqueue(*args, **{**kwargs, CARRIER_KWARG: carrier})
            if span.is_recording():
                span.set_attribute(semconv.MESSAGING_MESSAGE_ID, str(result.id))
            return result
    except BaseException:
        _barrier.remove_child(identity.task_key, name)
        raise


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


def drop_carrier(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """wrapt wrapper of ``Task.call``: a carrier no ``task_started`` took is not an argument."""
    if CARRIER_KWARG in kwargs:
        kwargs = {k: v for k, v in kwargs.items() if k != CARRIER_KWARG}
    return wrapped(*args, **kwargs)
