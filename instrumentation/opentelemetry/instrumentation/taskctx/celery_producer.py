"""Celery's publish side: ``Task.apply_async`` and ``Celery.send_task`` wrapped (the nested-
launch policy: a signal cannot turn a publish into an inline run), and ``before_task_publish``
writing the ``otel_taskctx`` message header (see docs/celery.md).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import replace
from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.taskctx import barrier, celery_jobs, runs
from opentelemetry.instrumentation.taskctx.celery_jobs import job_key
from opentelemetry.instrumentation.taskctx.tracing import STATE

from otel_taskctx import policy, semconv
from otel_taskctx.context import context_with_identity, current_task
from otel_taskctx.errors import CanvasInsideJob, FanOutUnavailable, NestedTaskNotRegistered
from otel_taskctx.identity import TaskIdentity
from otel_taskctx.propagation import inject
from otel_taskctx.task_manager import TASK_MANAGER_PATH

log = logging.getLogger("otel_taskctx.instrumentation")

#: the message header that carries the task context
HEADER = "otel_taskctx"
#: the carrier's entry naming a fanned-out child's barrier record
FAN_OUT_FIELD = "fan_out"
MESSAGING_SYSTEM_VALUE = "celery"
#: the options of a launch that make it part of a canvas
CANVAS_OPTIONS = ("link", "link_error", "chain", "chord", "group_id")
_APPLY_ASYNC_ARGS = ("args", "kwargs", "task_id", "producer", "link", "link_error", "shadow")


def root_identity(task_id: str) -> TaskIdentity:
    """The identity of the job a root publish of ``task_id`` starts."""
    return TaskIdentity(job_key(task_id), TASK_MANAGER_PATH, bound_to=task_id)


def their_span(task: Any, task_id: str, publish: bool = False) -> Any:
    """opentelemetry-instrumentation-celery's span of ``task_id`` (None: not instrumented)."""
    if "opentelemetry.instrumentation.celery" not in sys.modules or task is None:
        return None
    try:
        from opentelemetry.instrumentation.celery import utils

        found = utils.retrieve_context(task, task_id, is_publish=publish)
    except Exception:  # another version's internals: our own spans then
        return None
    return found[0] if found else None


def theirs_active() -> bool:
    """Is opentelemetry-instrumentation-celery instrumented in this process?"""
    module = sys.modules.get("opentelemetry.instrumentation.celery")
    if module is None:
        return False
    try:
        return bool(module.CeleryInstrumentor().is_instrumented_by_opentelemetry)
    except Exception:
        return False


def always_eager(task: Any) -> bool:
    app = getattr(task, "app", None) or getattr(task, "_app", None)
    try:
        return bool(app.conf.task_always_eager)
    except Exception:
        return False


def _celery_dispatch(task: Any, options: dict[str, Any]) -> bool:
    """A retry of the running task (same id): Celery's own publish, not a nested launch."""
    request = getattr(task, "request", None)
    running = getattr(request, "id", None) if request is not None else None
    return running is not None and options.get("task_id") == running


def _refuse_canvas(identity: TaskIdentity, label: str, options: dict[str, Any]) -> None:
    used = [name for name in CANVAS_OPTIONS if options.get(name)]
    if used:
        raise CanvasInsideJob(
            f"cannot launch {label} with {', '.join(used)} inside job {identity.task_key}: "
            "canvas (group, chain, chord, link, link_error) inside a job is not covered by "
            "the job (its steps would end outside it). Fix: launch the steps one by one "
            "(they follow the nested policy: inline or @fan_out), or launch the canvas as a "
            "job of its own under allow_nested_async()."
        )


def traced_apply_async(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """wrapt wrapper of ``celery.app.task.Task.apply_async``."""
    if not STATE.active:
        return wrapped(*args, **kwargs)
    options = dict(zip(_APPLY_ASYNC_ARGS, args, strict=False))
    options.update(kwargs)
    identity = current_task()
    how = policy.nested_launch(identity, instance)
    if how == policy.ENQUEUE or _celery_dispatch(instance, options):
        if always_eager(instance):
            return wrapped(*args, **kwargs)  # runs now: the prerun receiver starts the job
        return _publish(
            runs.Plan(_start_send(instance.name), task=instance.name), wrapped, args, kwargs
        )
    _refuse_canvas(identity, instance.name, options)
    call_args, call_kwargs = tuple(options.get("args") or ()), dict(options.get("kwargs") or {})
    if how == policy.FAN_OUT:
        return fan_out(identity, instance, lambda: wrapped(*args, **kwargs))
    return run_nested(identity, instance, call_args, call_kwargs)


def traced_send_task(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """wrapt wrapper of ``celery.Celery.send_task`` (``apply_async`` decided already)."""
    plan = runs.plan()
    if not STATE.active or (plan is not None and not plan.done):
        return wrapped(*args, **kwargs)
    name = args[0] if args else kwargs.get("name")
    options = dict(zip(("name", "args", "kwargs"), args, strict=False))
    options.update(kwargs)
    identity = current_task()
    how = policy.nested_launch(identity, name)
    if how == policy.ENQUEUE or _celery_dispatch(instance.current_worker_task, options):
        return _publish(runs.Plan(_start_send(str(name)), task=str(name)), wrapped, args, kwargs)
    _refuse_canvas(identity, str(name), options)
    task = instance.tasks.get(name) if isinstance(name, str) else None
    if how == policy.FAN_OUT:
        if task is None and instance.conf.task_always_eager:
            _refuse_eager(identity, str(name))
        return fan_out(identity, task or str(name), lambda: wrapped(*args, **kwargs))
    if task is None:
        raise NestedTaskNotRegistered(
            f"cannot run task {name!r} inline inside job {identity.task_key}: no task of that "
            "name is registered in this process (send_task of a nested task runs it here, "
            "under the job's key). Fix: import the module that defines it in this worker, "
            f"mark it @fan_out (or list it in OTEL_TASKCTX['FAN_OUT']) to run it on a worker "
            "that has it, or launch it as a job of its own under allow_nested_async()."
        )
    call_args, call_kwargs = tuple(options.get("args") or ()), dict(options.get("kwargs") or {})
    return run_nested(identity, task, call_args, call_kwargs)


def _publish(plan: runs.Plan, publish: Any, args: tuple, kwargs: dict) -> Any:
    with runs.sending(plan):
        return publish(*args, **kwargs)


def _start_send(label: str, child: TaskIdentity | None = None) -> trace.Span:
    """Our PRODUCER span, unless opentelemetry-instrumentation-celery makes one."""
    if theirs_active():
        return trace.INVALID_SPAN
    attributes: dict[str, Any] = {}
    if child is not None:
        attributes.update(child.lineage_attributes())
        attributes[semconv.NESTED_MODE] = "fan_out"
    return runs.send_span(MESSAGING_SYSTEM_VALUE, label, attributes)


def run_nested(identity: TaskIdentity, task: Any, args: tuple, kwargs: dict) -> Any:
    """Run a nested launch now through ``Task.apply(throw=True)``, under the job's key: its
    ``EagerResult``; a failure raises here and fails the caller."""
    results: list[Any] = []

    def body() -> None:
        results.append(task.apply(args, kwargs, throw=True))

    runs.run_inline(identity, body, (), {}, label=task.name)
    return results[0]


def _refuse_eager(identity: TaskIdentity, label: str) -> None:
    raise FanOutUnavailable(
        f"cannot fan out {label} from task {identity.task_key}: task_always_eager runs every "
        "task in the caller, so no worker can run the child while the job waits for it. Fix: "
        "turn task_always_eager off, or let it run inline (@run_inline, or leave it out of "
        "OTEL_TASKCTX['FAN_OUT'] / NESTED_POLICY)."
    )


def fan_out(identity: TaskIdentity, task: Any, publish: Any) -> Any:
    """Publish ``task`` as a fanned-out child of ``identity``'s job (its barrier record
    first); the job's own result is held until its last child ends."""
    label = task if isinstance(task, str) else task.name
    if not isinstance(task, str) and always_eager(task):
        _refuse_eager(identity, label)
    celery_jobs.hold_result(identity)
    with barrier.new_child(identity, label) as (name, child):
        plan = runs.Plan(_start_send(label, child), child, name, task=label)
        return _publish(plan, lambda: publish(), (), {})


def _canvas(headers: dict[str, Any], body: Any) -> bool:
    """Does the message carry canvas (protocol 2: the body's embed, the group header)?"""
    embed = body[2] if isinstance(body, tuple | list) and len(body) == 3 else None
    parts = ("callbacks", "errbacks", "chain", "chord")
    return bool(headers.get("group")) or (
        isinstance(embed, dict) and any(embed.get(p) for p in parts)
    )


def on_before_task_publish(
    sender: Any = None, body: Any = None, headers: Any = None, **kwargs: Any
) -> None:
    """``before_task_publish``: the header of a root job, or of a fanned-out child (bound to
    this message's task id); none for a canvas message (it runs as a plain task)."""
    if not STATE.active or not isinstance(headers, dict):
        return
    headers.pop(HEADER, None)  # only otel_taskctx writes it
    task_id = headers.get("id")
    if not isinstance(task_id, str) or _canvas(headers, body):
        return
    plan = runs.plan()
    if plan is not None and (plan.done or plan.task != sender):
        plan = None
    try:
        span = plan.span if plan is not None else trace.INVALID_SPAN
        if not span.get_span_context().is_valid:
            span = their_span(_registered(sender), task_id, publish=True) or span
        ctx = trace.set_span_in_context(span) if span.get_span_context().is_valid else None
        carrier: dict[str, str] = {}
        if plan is not None and plan.child is not None:
            identity = replace(plan.child, bound_to=task_id)
            inject(carrier, context_with_identity(identity, ctx=ctx))
            carrier[FAN_OUT_FIELD] = plan.fan_out
        else:
            identity = root_identity(task_id)
            inject(carrier, context_with_identity(identity, ctx=ctx))
        headers[HEADER] = carrier
    except Exception:  # the publish goes on: the task then runs as a plain task
        log.exception("could not write the task context of Celery task %s", task_id)
        return
    if plan is not None:
        plan.done = True
    if span.is_recording():
        span.set_attribute(semconv.MESSAGING_MESSAGE_ID, task_id)
        span.set_attribute(semconv.LAUNCHED_TASK_KEY, identity.task_key)


def _registered(name: Any) -> Any:
    from celery import current_app

    try:
        return current_app.tasks.get(name)
    except Exception:
        return None
