"""Descendants: lock the objects a job's nested work touches, under the job's task key.

:func:`register_descendants` is the call for code that runs inside a task (a model's
``save()``); :func:`register_for` does the same for a given identity (the instrumentation's
inline launches, the span processor). Both reserve in the conflict store of the task's
powercrud manager (:func:`resolve_manager`), all-or-nothing.

Imports of Django and powercrud happen at call time, so ``import otel_taskctx`` needs only
the OpenTelemetry API.
"""

from __future__ import annotations

import logging
import sys
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
    raise TypeError(
        f"model must be a model class, instance or 'app_label.ModelName', got {model!r}"
    )


def resolve_manager(identity: TaskIdentity) -> Any:
    """The manager named by a verified identity (one instance per thread and class): a
    powercrud ``AsyncManager`` (subclass), or for ``django.tasks`` tasks the
    :class:`~otel_taskctx.task_manager.TaskManager`."""
    path = identity.manager_class_path
    cache: dict[str | None, Any] = getattr(_managers, "by_path", None) or {}
    _managers.by_path = cache
    manager = cache.get(path)
    if manager is not None:
        return manager
    if path == TASK_MANAGER_PATH:  # a django.tasks task: no powercrud
        from otel_taskctx.task_manager import TaskManager

        manager = TaskManager()
    elif path:
        from django.utils.module_loading import import_string
        from powercrud.async_manager import AsyncManager

        cls = import_string(path)
        if not (isinstance(cls, type) and issubclass(cls, AsyncManager)):
            raise TypeError(
                f"manager class {path} of task {identity.task_key} is not an AsyncManager"
            )
        manager = AsyncManager.resolve_manager(path)
    else:
        from powercrud.async_manager import AsyncManager

        manager = AsyncManager()
    cache[path] = manager
    return manager


def _locking_manager(identity: TaskIdentity) -> Any:
    """The task's manager; a cache powercrud refuses (LocMem, Dummy) refuses the lock."""
    from django.core.exceptions import ImproperlyConfigured

    from otel_taskctx.errors import ConflictStoreUnavailable
    from otel_taskctx.powercrud_cache import refusal_for_alias

    try:
        return resolve_manager(identity)
    except ImproperlyConfigured as exc:
        raise ConflictStoreUnavailable(refusal_for_alias() or str(exc)) from exc


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
    """Reserve descendant objects under the current task key, all-or-nothing.

    Raises :class:`~otel_taskctx.errors.DescendantConflict` (nothing new reserved) when
    another task holds any of them, and
    :class:`~otel_taskctx.errors.ConflictStoreUnavailable` when the locks cannot be held.
    Outside a task, does nothing and says so (a false :class:`Registration`; logged at DEBUG
    once per call site).
    """
    from otel_taskctx.conflicts import normalise_ids

    label = model_label(model)
    id_list = normalise_ids(ids)
    identity = current_task()
    if identity is None:
        log_outside_task("register_descendants", "nothing was reserved")
        return Registration(False, "not inside a task", model=label)
    if not id_list:
        return Registration(False, "no ids", task_key=identity.task_key, model=label)
    result = register_for(identity, {label: id_list})
    return Registration(
        True,
        "reserved",
        task_key=identity.task_key,
        model=label,
        reserved=result.reserved.get(label, []),
        already_held=result.already_held.get(label, []),
    )


def register_for(
    identity: TaskIdentity,
    conflict_ids: Mapping[Any, Iterable[Hashable]],
    record_event: bool = True,
) -> Any:
    """Reserve ``conflict_ids`` (``{model: ids}``) under ``identity``'s task key.

    All-or-nothing: raises ``DescendantConflict`` or ``ConflictStoreUnavailable``. With
    ``record_event``, the current span gets a descendants event per model (marked forwarded,
    so the span processor does not reserve them again). Returns the
    :class:`~otel_taskctx.conflicts.Reservation`.
    """
    from otel_taskctx.conflicts import Reservation, get_conflict_store, normalise_ids

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
    result = get_conflict_store(_locking_manager(identity)).reserve(identity.task_key, wanted)
    if record_event:
        span = trace.get_current_span()
        if span.is_recording():
            for label, ids in wanted.items():
                span.add_event(
                    semconv.DESCENDANTS_EVENT, semconv.descendants_attributes(label, ids)
                )
    return result


#: call sites (file, line) already logged as calling a helper outside a task
_outside_task_sites: set[tuple[str, int]] = set()


def log_outside_task(helper: str, outcome: str) -> None:
    """Say at DEBUG, once per call site of ``helper``, that it was called outside a task."""
    if not log.isEnabledFor(logging.DEBUG):
        return
    caller = sys._getframe(2)  # 0: here, 1: the helper, 2: the code that called it
    site = (caller.f_code.co_filename, caller.f_lineno)
    if site in _outside_task_sites:
        return
    _outside_task_sites.add(site)
    log.debug("%s() called outside a task at %s:%d: %s", helper, site[0], site[1], outcome)
