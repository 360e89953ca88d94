"""Drop-in replacement for ``powercrud.async_context``, backed by the baggage identity.

``save()`` code written for powercrud keeps working when it imports these names from here
instead; unlike powercrud's ContextVar, the identity crosses the broker into workers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from otel_taskctx.context import current_task
from otel_taskctx.context import task_context as _task_context

log = logging.getLogger("otel_taskctx.compat")


@contextmanager
def task_context(task_name: str, manager_class_path: str | None = None) -> Iterator[None]:
    """Context manager to set the current async task metadata (powercrud's signature)."""
    with _task_context(task_name, manager_class_path):
        yield


def get_current_task() -> Any:
    """The current task as powercrud's ``TaskContext`` (``task_name``, ``manager_class_path``)."""
    identity = current_task()
    if identity is None:
        return None
    from powercrud.async_context import TaskContext

    return TaskContext(task_name=identity.task_key, manager_class_path=identity.manager_class_path)


def skip_nested_async() -> bool:
    """Return True if the current call stack is already inside an async task."""
    return current_task() is not None


def register_descendant_conflicts(model_path: str, ids: Iterable[int]) -> None:
    """Register descendant objects in the conflict store under the current task.

    Same behaviour as powercrud's helper: ids are coerced with ``int()``, the model label is
    normalised when the model exists, and the base ``AsyncManager`` (looked up now) adds the
    locks with ``add_conflict_ids``; a conflict is logged, not raised.
    """
    context = current_task()
    if not context:
        return
    id_set = {int(pk) for pk in ids if pk is not None}
    if not id_set:
        return
    model_label = model_path
    try:
        from django.apps import apps

        model = apps.get_model(model_path)
        model_label = f"{model._meta.app_label}.{model._meta.model_name}"
    except Exception:
        pass
    from powercrud.async_manager import AsyncManager

    manager = AsyncManager()
    if not manager.add_conflict_ids(context.task_key, {model_label: id_set}):
        from otel_taskctx.logids import format_ids

        log.warning(
            "register_descendant_conflicts: some %s ids %s are locked by another task",
            model_label,
            format_ids(id_set),
        )
