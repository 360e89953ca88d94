"""Helpers for code that runs inside a task (model ``save()``, services): Django-facing.

Imports of Django and powercrud happen at call time, so ``import otel_taskctx`` needs only
the OpenTelemetry API.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace

from otel_taskctx import semconv
from otel_taskctx.context import current_task
from otel_taskctx.identity import TaskIdentity

log = logging.getLogger("otel_taskctx")

_managers = threading.local()


def model_label(model: Any) -> str:
    """``app_label.modelname`` for a model class, an instance or an ``"app.Model"`` string."""
    meta = getattr(model, "_meta", None)
    if meta is not None:
        return f"{meta.app_label}.{meta.model_name}"
    if isinstance(model, str):
        if model.count(".") != 1 or not all(model.split(".")):
            raise ValueError(f"model must be 'app_label.ModelName', got {model!r}")
        from django.apps import apps

        try:
            meta = apps.get_model(model)._meta
            return f"{meta.app_label}.{meta.model_name}"
        except LookupError:
            app_label, name = model.split(".")
            return f"{app_label}.{name.lower()}"
    raise TypeError(f"model must be a model class, instance or 'app_label.ModelName', got {model!r}")


def resolve_manager(identity: TaskIdentity) -> Any:
    """The AsyncManager named by a verified identity (one instance per thread and class)."""
    from django.utils.module_loading import import_string
    from powercrud.async_manager import AsyncManager

    path = identity.manager_class_path
    cache: dict[str | None, Any] = getattr(_managers, "by_path", None) or {}
    _managers.by_path = cache
    manager = cache.get(path)
    if manager is not None:
        return manager
    if path:
        cls = import_string(path)
        if not (isinstance(cls, type) and issubclass(cls, AsyncManager)):
            raise TypeError(f"manager class {path} of task {identity.task_key} is not an AsyncManager")
        manager = AsyncManager.resolve_manager(path)
    else:
        manager = AsyncManager()
    cache[path] = manager
    return manager


def clear_manager_cache() -> None:
    _managers.by_path = {}


@dataclass
class Registration:
    """Result of :func:`register_descendants`; false when nothing was done (no task)."""

    registered: bool
    reason: str
    task_key: str | None = None
    model: str | None = None
    reserved: list[Hashable] = field(default_factory=list)
    already_held: list[Hashable] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.registered


def register_descendants(model: Any, ids: Iterable[Hashable]) -> Registration:
    """Reserve descendant objects under the current task key, all-or-nothing.

    Raises :class:`~otel_taskctx.errors.DescendantConflict` (nothing new reserved) when
    another task holds any of them. Outside a task, does nothing and says so.
    """
    from otel_taskctx.conflicts import get_conflict_store, normalise_ids

    label = model_label(model)
    id_list = normalise_ids(ids)
    identity = current_task()
    if identity is None:
        return Registration(False, "not inside a task", model=label)
    if not id_list:
        return Registration(False, "no ids", task_key=identity.task_key, model=label)
    store = get_conflict_store(resolve_manager(identity))
    result = store.reserve(identity.task_key, {label: id_list})
    span = trace.get_current_span()
    if span.is_recording():
        span.add_event(
            semconv.DESCENDANTS_EVENT,
            {
                semconv.DESCENDANTS_MODEL: label,
                semconv.DESCENDANTS_IDS: [str(i) for i in id_list[:1000]],
                semconv.DESCENDANTS_COUNT: len(id_list),
                semconv.FORWARDED: True,
            },
        )
    return Registration(
        True,
        "reserved",
        task_key=identity.task_key,
        model=label,
        reserved=result.reserved.get(label, []),
        already_held=result.already_held.get(label, []),
    )


def report_progress(message: str) -> bool:
    """Store ``message`` as the current task's progress; False (no-op) outside a task."""
    identity = current_task()
    if identity is None:
        return False
    text = str(message)
    resolve_manager(identity).update_progress(identity.task_key, text)
    span = trace.get_current_span()
    if span.is_recording():
        span.add_event(
            semconv.PROGRESS_EVENT,
            {semconv.PROGRESS_MESSAGE: text, semconv.FORWARDED: True},
        )
    return True
