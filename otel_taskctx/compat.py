"""Drop-in replacement for ``powercrud.async_context``, backed by the baggage identity.

``save()`` code written for powercrud keeps working when it imports these names from here
instead; unlike powercrud's ContextVar, the identity crosses the broker into workers.

The module is self-contained, so it can also stand in for powercrud's module without any
edit to the code that imports it: :func:`install` makes ``powercrud.async_context`` (the
``sys.modules`` entry and the attribute of the ``powercrud`` package) this module, and
:func:`uninstall` puts powercrud's own module back.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, fields, is_dataclass
from types import ModuleType
from typing import Optional

from otel_taskctx.context import current_task
from otel_taskctx.context import task_context as _task_context
from otel_taskctx.errors import DescendantConflict
from otel_taskctx.logids import format_ids

log = logging.getLogger("otel_taskctx.compat")

#: the module this one stands in for
POWERCRUD_MODULE = "powercrud.async_context"

__all__ = [
    # powercrud's names (its module has no __all__, so its star import gives these too)
    "ContextVar",
    "Iterable",
    "Optional",
    "annotations",
    "contextmanager",
    "dataclass",
    # ours
    "POWERCRUD_MODULE",
    "TaskContext",
    "get_current_task",
    "install",
    "installed",
    "powercrud_module",
    "register_descendant_conflicts",
    "skip_nested_async",
    "task_context",
    "uninstall",
]


def _find_powercrud_module() -> ModuleType | None:
    """powercrud's own ``async_context`` module, or None when powercrud is not installed.

    Looked up once, at import: it is stdlib-only, so importing it costs nothing. When this
    module already stands in for it (a reload, or a fresh import of this module after a
    swap), the real one is the one the standing-in module found.
    """
    module = sys.modules.get(POWERCRUD_MODULE)
    if module is None:
        try:
            module = importlib.import_module(POWERCRUD_MODULE)
        except ImportError:
            return None
    if getattr(module, "__name__", None) != POWERCRUD_MODULE:  # a stand-in (this module)
        return getattr(module, "_powercrud", None)
    return module


_powercrud = _find_powercrud_module()


@dataclass
class _TaskContextFallback:
    """powercrud's ``TaskContext`` for when powercrud is not installed: the same fields."""

    task_name: str
    manager_class_path: str | None = None


_TaskContextFallback.__name__ = _TaskContextFallback.__qualname__ = "TaskContext"


def _task_context_type() -> type:
    """powercrud's own ``TaskContext`` class when it has the expected fields (so instances
    compare equal and ``isinstance`` holds across both modules), else the equal dataclass."""
    cls = getattr(_powercrud, "TaskContext", None)
    if (
        isinstance(cls, type)
        and is_dataclass(cls)
        and [f.name for f in fields(cls)] == ["task_name", "manager_class_path"]
    ):
        return cls
    return _TaskContextFallback


#: ``task_name`` and ``manager_class_path`` of the current task (powercrud's dataclass)
TaskContext = _task_context_type()


def powercrud_module() -> ModuleType | None:
    """powercrud's own ``async_context`` module (also while this one stands in for it)."""
    return _powercrud


@contextmanager
def task_context(task_name: str, manager_class_path: str | None = None) -> Iterator[None]:
    """Context manager to set the current async task metadata (powercrud's signature)."""
    with _task_context(task_name, manager_class_path):
        yield


def get_current_task() -> TaskContext | None:
    """The current task as a ``TaskContext`` (``task_name``, ``manager_class_path``), or None."""
    identity = current_task()
    if identity is None:
        return None
    return TaskContext(task_name=identity.task_key, manager_class_path=identity.manager_class_path)


def skip_nested_async() -> bool:
    """Return True if the current call stack is already inside an async task."""
    return current_task() is not None


def register_descendant_conflicts(model_path: str, ids: Iterable[int]) -> None:
    """Register descendant objects in the conflict store under the current task.

    Same behaviour as powercrud's helper: ids are coerced with ``int()``, the model label is
    normalised when the model exists, and the base ``AsyncManager`` (looked up now) adds the
    locks with ``add_conflict_ids``. A conflict (``add_conflict_ids`` returns ``False``, or
    raises the conflict store's :class:`~otel_taskctx.errors.DescendantConflict`) is logged
    as a warning, not raised; any other return value, ``None`` included, is not a conflict.
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
    try:
        added = manager.add_conflict_ids(context.task_key, {model_label: id_set})
    except DescendantConflict as exc:
        log.warning("register_descendant_conflicts: %s", exc)
        return
    if added is False:
        log.warning(
            "register_descendant_conflicts: some %s ids %s are locked by another task",
            model_label,
            format_ids(id_set),
        )


# --------------------------------------------------------------------------- the swap

#: what :func:`install` replaced: (``sys.modules`` entry, the package attribute); None when
#: not installed by :func:`install`
_replaced: tuple[ModuleType | None, ModuleType | None] | None = None


def _this() -> ModuleType:
    return sys.modules[__name__]


def installed() -> bool:
    """True while this module stands in for ``powercrud.async_context``."""
    return sys.modules.get(POWERCRUD_MODULE) is _this()


def install() -> None:
    """Make ``powercrud.async_context`` this module, for code that imports it afterwards.

    Sets the ``sys.modules`` entry and the ``async_context`` attribute of the ``powercrud``
    package, so ``from powercrud.async_context import get_current_task`` and
    ``from powercrud import async_context`` both give this module's functions. Names that a
    module imported before the call stay bound to powercrud's own functions: call it before
    such code is imported (in ``settings.py``, for instance). Calling it again does nothing.
    Raises ``ImportError`` when powercrud is not installed.
    """
    global _replaced
    import powercrud

    this = _this()
    entry, attribute = sys.modules.get(POWERCRUD_MODULE), vars(powercrud).get("async_context")
    if entry is this and attribute is this:
        return
    if _replaced is None:
        _replaced = (
            _powercrud if entry is this else entry,
            _powercrud if attribute is this else attribute,
        )
    sys.modules[POWERCRUD_MODULE] = this
    powercrud.async_context = this  # type: ignore[attr-defined]


def uninstall() -> None:
    """Put powercrud's own module back where this one stands in for it (the ``sys.modules``
    entry and the package attribute), whether :func:`install` or a hand-made swap put it
    there; a module that replaced this one since is left alone. Calling it again does
    nothing."""
    global _replaced
    this = _this()
    entry, attribute = _replaced if _replaced is not None else (_powercrud, _powercrud)
    _replaced = None
    if sys.modules.get(POWERCRUD_MODULE) is this:
        if entry is None:
            del sys.modules[POWERCRUD_MODULE]
        else:
            sys.modules[POWERCRUD_MODULE] = entry
    package = sys.modules.get("powercrud")
    if package is not None and vars(package).get("async_context") is this:
        if attribute is None:
            delattr(package, "async_context")
        else:
            package.async_context = attribute  # type: ignore[attr-defined]
