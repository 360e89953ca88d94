"""How a launch runs: the one decision for every queue (:func:`nested_launch`).

Outside a task a launch is enqueued. Inside a task, in this order: ``allow_nested_async()`` or
``OTEL_TASKCTX["ENQUEUE_NESTED"]``: enqueued; the function's ``@fan_out`` / ``@run_inline``;
``NESTED_POLICY = "fan_out"`` or ``FAN_OUT`` listing it: fan-out; else inline (see
docs/fan_out.md). The decorators only mark the function (or a ``django.tasks`` task's).
"""

from __future__ import annotations

import functools
import pydoc
from collections.abc import Callable
from typing import Any

FAN_OUT = "fan_out"
INLINE = "inline"
ENQUEUE = "enqueue"
#: the attribute the decorators set on the function
ATTRIBUTE = "__otel_taskctx_nested__"


def _mark[F](obj: F, policy: str) -> F:
    # a django.tasks Task is a frozen dataclass around the function: mark the function
    target = getattr(obj, "func", None) if hasattr(obj, "enqueue") else obj
    object.__setattr__(target if target is not None else obj, ATTRIBUTE, policy)
    return obj


def fan_out[F](func: F) -> F:
    """A nested launch of ``func`` inside a job runs as a child job on another worker."""
    return _mark(func, FAN_OUT)


def run_inline[F](func: F) -> F:
    """A nested launch of ``func`` inside a job runs inline, under the job's key."""
    return _mark(func, INLINE)


def marked_policy(func: Any) -> str | None:
    for candidate in (func, getattr(func, "func", None), getattr(func, "__wrapped__", None)):
        policy = getattr(candidate, ATTRIBUTE, None) if candidate is not None else None
        if policy in (FAN_OUT, INLINE):
            return policy
    return None


def func_path(func: Any) -> str:
    """Dotted path of a task function (django-q2 accepts a callable or a dotted string)."""
    if isinstance(func, str):
        return func
    name = getattr(func, "name", None)
    if isinstance(name, str) and callable(getattr(func, "apply_async", None)):
        return name  # a Celery task: its registered name
    module = getattr(func, "__module__", None)
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None)
    if module and name:
        return f"{module}.{name}"
    return repr(func)


def resolve_callable(func: Any) -> Callable[..., Any]:
    """The callable for ``func``; a dotted path is located like django-q2's worker does."""
    if callable(func):
        return func
    target = pydoc.locate(func) if isinstance(func, str) else None
    if target is None or not callable(target):
        raise ValueError(f"Function {func} is not defined")
    return target


@functools.lru_cache(maxsize=1024)
def _marked_path(path: str) -> str | None:
    try:
        return marked_policy(resolve_callable(path))
    except Exception:  # a dotted path that does not import: the settings decide
        return None


def _listed(setting: str, func: Any) -> bool:
    from otel_taskctx.conf import get_setting

    listed = get_setting(setting) or ()
    if not listed:
        return False
    path = func_path(func)
    return any(path == (item if isinstance(item, str) else func_path(item)) for item in listed)


def nested_launch(identity: Any, func: Any) -> str:
    """:data:`ENQUEUE`, :data:`INLINE` or :data:`FAN_OUT` for a launch of ``func`` in the task
    ``identity`` (None: outside any task)."""
    from otel_taskctx.context import nested_async_allowed

    if identity is None or nested_async_allowed():
        return ENQUEUE
    try:
        if _listed("ENQUEUE_NESTED", func):
            return ENQUEUE
    except Exception:  # settings not configured: the default
        return INLINE
    return FAN_OUT if may_fan_out(func) else INLINE


def may_fan_out(func: Any) -> bool:
    """Does a nested launch of ``func`` fan out (its decorator, then the settings)?"""
    try:
        marked = _marked_path(func) if isinstance(func, str) else marked_policy(func)
        if marked is not None:
            return marked == FAN_OUT
        from otel_taskctx.conf import get_setting

        return get_setting("NESTED_POLICY") == FAN_OUT or _listed("FAN_OUT", func)
    except Exception:  # settings not configured
        return False
