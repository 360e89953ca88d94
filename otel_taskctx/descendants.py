"""Descendants: lock the objects a job's nested work touches, under the job's task key, in
the conflict store of the task's manager (Django and powercrud are imported at call time)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace

from otel_taskctx import semconv
from otel_taskctx.context import current_task
from otel_taskctx.identity import TaskIdentity
from otel_taskctx.task_manager import TASK_MANAGER_PATH

log = logging.getLogger("otel_taskctx")

_managers = threading.local()


def model_label(model: Any) -> str:
    """``app_label.modelname`` for a model class, an instance or an ``"app.Model"`` string."""
    meta = getattr(model, "_meta", None)
    if meta is None and isinstance(model, str):
        if model.count(".") != 1 or not all(model.split(".")):
            raise ValueError(f"model must be 'app_label.ModelName', got {model!r}")
        from django.apps import apps

        try:
            meta = apps.get_model(model)._meta
        except LookupError:
            return model.lower()
    if meta is None:
        raise TypeError(f"model must be a model class, instance or 'app.Model', got {model!r}")
    return f"{meta.app_label}.{meta.model_name}"


def resolve_manager(identity: TaskIdentity) -> Any:
    """The manager named by a verified identity (one instance per thread and class): a
    powercrud ``AsyncManager`` (subclass), or the ``TaskManager`` of ``django.tasks`` tasks."""
    managers = vars(_managers).setdefault("by_path", {})
    path = identity.manager_class_path
    if path not in managers:
        if path == TASK_MANAGER_PATH:  # a django.tasks task: no powercrud
            from otel_taskctx.task_manager import TaskManager

            managers[path] = TaskManager()
        else:
            from django.utils.module_loading import import_string
            from powercrud.async_manager import AsyncManager

            cls = import_string(path) if path else AsyncManager
            if not (isinstance(cls, type) and issubclass(cls, AsyncManager)):
                raise TypeError(
                    f"manager class {path} of task {identity.task_key} is not an AsyncManager"
                )
            managers[path] = AsyncManager.resolve_manager(path) if path else AsyncManager()
    return managers[path]


def clear_manager_cache(setting: str | None = None, **kwargs: Any) -> None:
    """Forget this thread's managers (a ``setting_changed`` receiver: CACHES and
    POWERCRUD_SETTINGS pick the cache a manager holds)."""
    if setting in (None, "CACHES", "POWERCRUD_SETTINGS"):
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
    """Reserve descendant objects under the current task key, all-or-nothing: raises
    ``DescendantConflict`` (nothing new reserved) or ``ConflictStoreUnavailable``. Outside a
    task, does nothing and says so (a false :class:`Registration`, a DEBUG log line)."""
    from otel_taskctx.conflicts.base import normalise_ids

    label = model_label(model)
    id_list = normalise_ids(ids)
    identity = current_task()
    if identity is None:
        log_outside_task("register_descendants", "nothing was reserved")
        return Registration(False, "not inside a task", model=label)
    if not id_list:
        return Registration(False, "no ids", task_key=identity.task_key, model=label)
    done = register_for(identity, {label: id_list})
    reserved, held = done.reserved.get(label, []), done.already_held.get(label, [])
    return Registration(True, "reserved", identity.task_key, label, reserved, held)


def register_for(
    identity: TaskIdentity,
    conflict_ids: Mapping[Any, Iterable[Hashable]],
    record_event: bool = True,
) -> Any:
    """Reserve ``conflict_ids`` (``{model: ids}``) under ``identity``'s task key, as
    :func:`register_descendants`; with ``record_event``, the current span gets a descendants
    event per model. Returns the :class:`~otel_taskctx.conflicts.Reservation`."""
    from otel_taskctx.conflicts import get_conflict_store
    from otel_taskctx.conflicts.base import Reservation, normalise_ids

    if not isinstance(conflict_ids, Mapping):
        raise TypeError(
            f"conflict_ids must map 'app_label.modelname' to ids, got {type(conflict_ids).__name__}"
        )
    wanted: dict[str, list[Hashable]] = {}
    for model, ids in conflict_ids.items():
        id_list = normalise_ids(ids or ())
        if id_list:
            wanted.setdefault(model_label(model), []).extend(id_list)
    if not wanted:
        return Reservation(identity.task_key)
    from django.core.exceptions import ImproperlyConfigured

    from otel_taskctx.errors import ConflictStoreUnavailable
    from otel_taskctx.powercrud_cache import refusal_for_alias

    try:
        manager = resolve_manager(identity)
    except ImproperlyConfigured as exc:  # a cache powercrud refuses (LocMem, Dummy)
        raise ConflictStoreUnavailable(refusal_for_alias() or str(exc)) from exc
    result = get_conflict_store(manager).reserve(identity.task_key, wanted)
    if record_event:
        span = trace.get_current_span()
        if span.is_recording():
            for label, ids in wanted.items():
                span.add_event(
                    semconv.DESCENDANTS_EVENT, semconv.descendants_attributes(label, ids)
                )
    return result


def log_outside_task(helper: str, outcome: str) -> None:
    """Say at DEBUG that ``helper`` was called outside a task; the record's ``pathname`` and
    ``lineno`` are those of the code that called it."""
    log.debug("%s() called outside a task: %s", helper, outcome, stacklevel=3)
