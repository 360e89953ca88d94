"""Django's task framework (``django.tasks``): the same task context as on django-q2.

* **Enqueue outside a task** (``Task.enqueue``, patched: the framework has no seam that can
  change a task's arguments): a root task. It gets a fresh task key and a signed identity that
  names :class:`otel_taskctx.task_manager.TaskManager`; the identity and the trace context go
  into a reserved keyword argument of the task (:data:`CARRIER_KWARG`), under a PRODUCER span.
* **Enqueue inside a task**: the nested task runs inline, under the parent's key, as nested
  django-q2 launches do (``ENQUEUE_NESTED`` and ``allow_nested_async()`` opt out); the call
  returns a finished ``TaskResult``. An exception propagates to the parent, so the parent
  fails with it.
* **In the worker** (``manage.py db_worker``, the ``ImmediateBackend``, any backend that sends
  the framework's signals): ``task_started`` takes the carrier out of the task's keyword
  arguments before the function is called, verifies the identity (one that does not verify is
  dropped with a warning), starts the CONSUMER span and attaches both; ``task_finished`` ends
  the span with the outcome, writes held progress and releases the task's locks. ``Task.call``
  drops a carrier that no signal took (a backend that sends no ``task_started``), so the
  function never sees it.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from opentelemetry import context, trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.taskctx import _nested, utils
from opentelemetry.instrumentation.taskctx._consumer import carries_identity
from opentelemetry.trace import SpanKind, Status, StatusCode

from otel_taskctx import semconv
from otel_taskctx.context import context_with_identity, current_task, identity_from_context
from otel_taskctx.identity import TaskIdentity
from otel_taskctx.propagation import extract, inject
from otel_taskctx.task_manager import TASK_MANAGER_PATH

log = logging.getLogger("otel_taskctx.instrumentation")

#: the keyword argument that carries the trace context and identity to the worker
CARRIER_KWARG = "_otel_taskctx"
MESSAGING_SYSTEM_VALUE = "django_tasks"


@dataclass
class _Run:
    span: trace.Span
    token: object
    identity: TaskIdentity | None


#: runs in progress, by the task result's id
_runs: dict[str, _Run] = {}


def _attributes(task: Any, operation: str) -> dict[str, Any]:
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
        return _run_nested(identity, instance, args, kwargs)
    span, carrier = _start_root(instance)
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

        return sync_to_async(_run_nested, thread_sensitive=True)(identity, instance, args, kwargs)
    return _aenqueue_root(wrapped, instance, args, kwargs)


async def _aenqueue_root(wrapped: Any, task: Any, args: tuple, kwargs: dict) -> Any:
    span, carrier = _start_root(task)
    with utils.running_in(span, trace.set_span_in_context(span)):
        result = await wrapped(*args, **{**kwargs, CARRIER_KWARG: carrier})
        if span.is_recording():
            span.set_attribute(semconv.MESSAGING_MESSAGE_ID, str(result.id))
        return result


def _start_root(task: Any) -> tuple[trace.Span, dict[str, str]]:
    """The PRODUCER span of a root task and the carrier of its new identity."""
    task_key = f"task-{uuid.uuid4().hex}"
    attributes = _attributes(task, "send")
    attributes[semconv.LAUNCHED_TASK_KEY] = task_key
    span = utils.STATE.tracer.start_span(
        f"send {task.module_path}", kind=SpanKind.PRODUCER, attributes=attributes
    )
    carrier: dict[str, str] = {}
    root = TaskIdentity(task_key, TASK_MANAGER_PATH)
    inject(carrier, context=context_with_identity(root, ctx=trace.set_span_in_context(span)))
    return span, carrier


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


# --------------------------------------------------------------------------- worker


def on_task_started(sender: Any = None, task_result: Any = None, **kwargs: Any) -> None:
    if not utils.STATE.active or task_result is None:
        return
    carrier = task_result.kwargs.pop(CARRIER_KWARG, None)
    try:
        ctx = extract(carrier) if isinstance(carrier, dict) else Context()
        identity = identity_from_context(ctx)
        if identity is None and carries_identity(carrier):
            log.warning(
                "task %s (%s) carried a task identity that does not verify (forged, damaged, "
                "or signed with another key): it runs as a plain task, without locks or "
                "nesting",
                task_result.id,
                task_result.task.module_path,
            )
        attributes = _attributes(task_result.task, "process")
        attributes[semconv.MESSAGING_MESSAGE_ID] = str(task_result.id)
        if identity is not None:
            attributes.update(identity.lineage_attributes())
        span = utils.STATE.tracer.start_span(
            f"process {task_result.task.module_path}",
            context=ctx,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        )
    except Exception:
        log.exception("could not start the consumer span of task %s", task_result.id)
        ctx, identity, span = Context(), None, trace.INVALID_SPAN
    token = context.attach(trace.set_span_in_context(span, ctx))
    _runs[str(task_result.id)] = _Run(span, token, identity)


def on_task_finished(sender: Any = None, task_result: Any = None, **kwargs: Any) -> None:
    if task_result is None:
        return
    run = _runs.pop(str(task_result.id), None)
    if run is None:
        return
    try:
        from django.tasks.base import TaskResultStatus

        if run.span.is_recording():
            if task_result.status == TaskResultStatus.FAILED:
                error = task_result.errors[-1] if task_result.errors else None
                error_type = error.exception_class_path if error else "task failed"
                run.span.set_status(Status(StatusCode.ERROR, error_type))
                run.span.set_attribute(semconv.ERROR_TYPE, error_type)
                if error is not None:
                    run.span.add_event(
                        "exception",
                        {"exception.type": error_type, "exception.stacktrace": error.traceback},
                    )
        if run.identity is not None:
            _finish_task(run.identity)
    finally:
        run.span.end()
        try:
            context.detach(run.token)
        except Exception:  # pragma: no cover - detached elsewhere
            log.debug("could not detach the context of task %s", task_result.id)


def _finish_task(identity: TaskIdentity) -> None:
    """The task ended: its held progress is written, its locks are released."""
    from otel_taskctx.conflicts import get_conflict_store
    from otel_taskctx.descendants import resolve_manager
    from otel_taskctx.progress import flush_progress

    try:
        flush_progress(identity.task_key)
        get_conflict_store(resolve_manager(identity)).release(identity.task_key)
    except Exception:
        log.warning("could not release the locks of task %s", identity.task_key, exc_info=True)
