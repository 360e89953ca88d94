"""Nested launch suppression: inside a verified task, a launch runs inline under the parent.

A nested step keeps the lock-holding task key of the job it runs in (its identity is
``parent.child(parent.task_key)``: same task key and manager, depth + 1, same root), so
locks it registers and progress it reports land under the key whose completion hook
releases them. Its INTERNAL span carries the lineage plus the id the launch returned.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.taskctx import utils
from opentelemetry.trace import SpanKind

from otel_taskctx import semconv
from otel_taskctx.context import context_with_identity
from otel_taskctx.descendants import register_for
from otel_taskctx.identity import TaskIdentity


def run_inline(
    identity: TaskIdentity,
    func: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    conflict_ids: Mapping[Any, Iterable[Hashable]] | None = None,
    label: str | None = None,
) -> str:
    """Run a suppressed launch now, in the caller's context; return its nested id.

    Order: the function is located, the span starts, descendants are reserved (a conflict
    raises before anything runs), then the function runs. Exceptions propagate. ``label``
    names the step (default: the function's dotted path).
    """
    label = label or utils.func_path(func)
    target = utils.resolve_callable(func)
    step_id = utils.nested_id(identity.task_key, label)
    child = identity.child(identity.task_key, identity.manager_class_path)
    ctx = context_with_identity(child)
    attributes: dict[str, Any] = dict(child.lineage_attributes())
    attributes[semconv.NESTED_ID] = step_id
    attributes[semconv.NESTED_MODE] = "inline"
    attributes[semconv.CODE_FUNCTION_NAME] = label
    span = utils.STATE.tracer.start_span(
        label, context=ctx, kind=SpanKind.INTERNAL, attributes=attributes
    )
    with utils.running_in(span, trace.set_span_in_context(span, ctx)):
        if conflict_ids:
            register_for(child, conflict_ids)
        target(*args, **kwargs)
    return step_id


def run_suppressed_async_task(
    identity: TaskIdentity, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> str:
    """``async_task(func, *args, **kwargs)`` inside a task: django-q2 options are dropped.

    A ``task_key`` kwarg, if the caller passed one, is replaced by the job's task key.
    Hooks and chains of the suppressed launch do not run: the parent's own hook runs when
    the parent ends.
    """
    call_kwargs = {k: v for k, v in kwargs.items() if k not in utils.Q_OPTION_KEYS}
    if "task_key" in call_kwargs:
        call_kwargs["task_key"] = identity.task_key
    return run_inline(identity, func, tuple(args), call_kwargs)


def run_suppressed_launch(
    identity: TaskIdentity, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> str:
    """``AsyncManager.launch_async_task(...)`` inside a task.

    Like powercrud, a trailing UUID positional argument is the requested task key and is
    not passed on; the function receives the job's own task key as ``task_key``.
    """
    call_args = list(args)
    requested = kwargs.get("task_key")
    if requested is None and call_args and utils.is_uuid_text(call_args[-1]):
        call_args.pop()
    call_kwargs = {k: v for k, v in kwargs.items() if k not in utils.LAUNCH_OPTION_KEYS}
    call_kwargs["task_key"] = identity.task_key
    return run_inline(
        identity, func, tuple(call_args), call_kwargs, conflict_ids=kwargs.get("conflict_ids")
    )
