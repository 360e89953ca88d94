"""How a nested launch of a function runs, chosen on the function itself.

Inside a running task, a nested launch runs inline under the job's key (the default) or fans
out to another worker as a child job the job waits for (see docs/fan_out.md). Settings choose
for many functions at once (``OTEL_TASKCTX["NESTED_POLICY"]``, ``["FAN_OUT"]``); these
decorators choose for one, and win over the settings::

    from otel_taskctx import fan_out, run_inline

    @fan_out
    def sync_chapters(book_id, task_key=None): ...

    @run_inline  # even where NESTED_POLICY is "fan_out"
    def renumber(book_id, task_key=None): ...

They work on plain functions (django-q2, powercrud) and on ``django.tasks`` tasks, above or
below ``@task``. They only mark the function: nothing changes when it is called directly.
"""

from __future__ import annotations

from typing import Any

FAN_OUT = "fan_out"
INLINE = "inline"
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
    """``"fan_out"``, ``"inline"`` or None (not decorated) for a function or a task."""
    for candidate in (func, getattr(func, "func", None), getattr(func, "__wrapped__", None)):
        policy = getattr(candidate, ATTRIBUTE, None) if candidate is not None else None
        if policy in (FAN_OUT, INLINE):
            return policy
    return None
