"""django-q2's enqueue side: the ``async_task`` and ``launch_async_task`` wrappers and the
``pre_enqueue`` receiver that writes the carrier into the task package.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from opentelemetry import context
from opentelemetry.instrumentation.taskctx import fan_out, runs
from opentelemetry.instrumentation.taskctx.tracing import STATE

from otel_taskctx import policy, semconv
from otel_taskctx.context import (
    context_without_identity,
    current_task,
    identity_from_context,
)
from otel_taskctx.identity import TaskIdentity, sign, validate_class_path, validate_task_key
from otel_taskctx.policy import func_path
from otel_taskctx.propagation import inject

log = logging.getLogger("otel_taskctx.instrumentation")

#: keys of the task package: the carrier (never the function's kwargs), and the job key a
#: fanned-out child belongs to
CARRIER_KEY = "_otel_taskctx"
FAN_OUT_KEY = "_otel_taskctx_fan_out"
#: options ``async_task`` takes from its kwargs; ``launch_async_task``'s own keywords
Q_OPTION_KEYS = frozenset(
    "hook group save sync cached ack_failure iter_count iter_cached chain broker cluster "
    "timeout task_name q_options".split()
)
LAUNCH_OPTION_KEYS = frozenset(
    "conflict_ids user affected_objects task_key group timeout sync cached broker q_options "
    "save".split()
)

_LAUNCH_KEY = context.create_key("otel_taskctx.launch")


@dataclass
class _Launch:
    """One ``launch_async_task`` call; its first enqueue is the job it launches."""

    manager_class_path: str
    used: bool = False
    user_id: str | None = None
    user_label: str | None = None


def _user_of(user: Any) -> tuple[str | None, str | None]:
    """``(id, label)`` of the ``user=`` passed to ``launch_async_task`` (a user or an id)."""
    if user is None or getattr(user, "is_anonymous", False):
        return None, None
    pk = getattr(user, "pk", user)
    if pk is None or not isinstance(pk, (int, str)):
        return None, None
    label = user.get_username() if hasattr(user, "get_username") else None
    return str(pk)[:200], (str(label)[:200] if label else None)


def _own_identity(task: dict[str, Any], launch: _Launch) -> TaskIdentity | None:
    """The identity of a job launched by powercrud: its task key and manager class."""
    kwargs = task.get("kwargs") or {}
    manager = kwargs.get("manager_class") if isinstance(kwargs, dict) else None
    try:
        manager = validate_class_path(manager) if manager else None
    except ValueError:
        log.warning("ignoring invalid manager_class %r of task %s", manager, task.get("name"))
        manager = None
    try:
        key = validate_task_key(str(task.get("name")))
    except ValueError as exc:
        log.warning("launched job has no usable task key (%s): it runs without identity", exc)
        return None
    return TaskIdentity(key, manager or launch.manager_class_path)


def on_pre_enqueue(sender: Any = None, task: dict[str, Any] | None = None, **kwargs: Any) -> None:
    """Write the carrier into the package: trace context and baggage without the caller's
    identity; a job launched by powercrud or fanned out gets its own signed identity."""
    if not STATE.active or not isinstance(task, dict):
        return
    try:
        ctx = context.get_current()
        plan = runs.plan()
        own: TaskIdentity | None = None
        if plan is None:
            parent = identity_from_context(ctx)
            if parent is not None:
                log.warning(
                    "a job (%s) was enqueued inside task %s without passing through the "
                    "instrumented async_task; it runs as a separate job without the "
                    "parent's identity",
                    func_path(task.get("func")),
                    parent.task_key,
                )
        elif plan.child is not None:
            own = plan.child
            task[FAN_OUT_KEY] = own.task_key
        elif plan.launch is not None:
            own = _own_identity(task, plan.launch)
        carrier: dict[str, str] = {}
        if own is not None:
            inject(carrier, ctx, token=sign(own))  # the job's own identity, not the caller's
        else:
            inject(carrier, context_without_identity(ctx))
        task[CARRIER_KEY] = carrier
        span = plan.span if plan is not None else None
        if span is not None and span.is_recording():
            span.set_attributes(_package_attributes(task, own, plan.launch))
    except Exception:  # the enqueue must go on whatever happens here
        log.exception("could not attach the trace context to task %s", task.get("name"))


def _package_attributes(
    task: dict[str, Any], own: TaskIdentity | None, launch: _Launch | None
) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        semconv.MESSAGING_MESSAGE_ID: str(task.get("id")),
        semconv.TASK_NAME: str(task.get("name")),
        semconv.MESSAGING_DESTINATION_NAME: str(task.get("cluster") or _default_cluster()),
    }
    if own is not None:
        attributes[semconv.LAUNCHED_TASK_KEY] = own.task_key
    if launch is not None and launch.user_id is not None:
        # who launched the job: the viewer scopes job trees by it
        attributes["enduser.id"] = launch.user_id
        if launch.user_label:
            attributes["taskctx.user"] = launch.user_label
    if task.get("sync"):
        attributes[semconv.TASK_SYNC] = True
    return attributes


def _default_cluster() -> str:
    from django_q.conf import Conf

    return Conf.CLUSTER_NAME or Conf.PREFIX


def _enqueue(
    original: Any,
    func: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    child: TaskIdentity | None = None,
) -> Any:
    label = func_path(func)
    launch: _Launch | None = None if child else context.get_value(_LAUNCH_KEY)
    if launch is not None and launch.used:
        launch = None  # an enqueue inside the launched one: the launch is taken already
    if launch is not None:
        launch.used = True
    group = kwargs.get("group") or (kwargs.get("q_options") or {}).get("group")
    attributes = {semconv.TASK_GROUP: str(group)} if group else {}
    span = runs.send_span(semconv.MESSAGING_SYSTEM_VALUE, label, attributes)
    with runs.sending(runs.Plan(span, child, launch=launch)):
        return original(func, *args, **kwargs)


def _nested_launch(
    identity: TaskIdentity, func: Any, args: tuple, kwargs: dict, launch: bool, how: str
) -> Any:
    """A launch inside a task, as the policy decided: fanned out, or run inline under the
    job's key. Like powercrud, an inline launch's trailing UUID positional argument is its
    requested task key; the function gets the job's key as ``task_key``."""
    args = list(args)
    inline_launch = launch and how != policy.FAN_OUT and kwargs.get("task_key") is None
    if inline_launch and args and _is_uuid(args[-1]):
        args.pop()
    if how == policy.FAN_OUT:
        drop = LAUNCH_OPTION_KEYS if launch else {"hook", "sync"}
    else:
        drop = LAUNCH_OPTION_KEYS if launch else Q_OPTION_KEYS
    call_kwargs = {k: v for k, v in kwargs.items() if k not in drop}
    if launch or "task_key" in call_kwargs:
        call_kwargs["task_key"] = identity.task_key
    conflict_ids = kwargs.get("conflict_ids") if launch else None
    if how == policy.FAN_OUT:
        return fan_out.launch(
            identity, func, tuple(args), call_kwargs, _enqueue, conflict_ids, kwargs.get("sync")
        )
    return runs.run_inline(identity, func, tuple(args), call_kwargs, conflict_ids=conflict_ids)


def _is_uuid(value: object) -> bool:
    try:
        uuid.UUID(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, AttributeError):
        return False
    return isinstance(value, str)


def traced_async_task(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """wrapt wrapper of ``django_q.tasks.async_task(func, *args, **kwargs)``."""
    if not STATE.active or not args:
        return wrapped(*args, **kwargs)
    func, rest = args[0], args[1:]
    identity = current_task()
    how = policy.nested_launch(identity, func)
    if how != policy.ENQUEUE:
        return _nested_launch(identity, func, rest, kwargs, launch=False, how=how)
    return _enqueue(wrapped, func, rest, kwargs)


def traced_launch_async_task(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """wrapt wrapper of ``AsyncManager.launch_async_task(func, *args, **kwargs)``."""
    if not STATE.active or not args:
        return wrapped(*args, **kwargs)
    func, rest = args[0], args[1:]
    identity = current_task()
    how = policy.nested_launch(identity, func)
    if how != policy.ENQUEUE:
        return _nested_launch(identity, func, rest, kwargs, launch=True, how=how)
    user_id, user_label = _user_of(kwargs.get("user"))
    manager = f"{type(instance).__module__}.{type(instance).__qualname__}"
    launch = _Launch(manager, user_id=user_id, user_label=user_label)
    token = context.attach(context.set_value(_LAUNCH_KEY, launch))
    try:
        return wrapped(*args, **kwargs)
    finally:
        context.detach(token)
