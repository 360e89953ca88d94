"""Drop-in replacement for ``powercrud.async_context`` backed by the baggage identity, or a
stand-in for it (:func:`install`). It has every public name of powercrud's module (which has
no ``__all__``: its star import gives the imported names too)."""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar  # noqa: F401 (a public name of powercrud's module)
from dataclasses import dataclass, make_dataclass  # noqa: F401 (as ContextVar)
from types import ModuleType
from typing import Iterable, Optional  # noqa: F401, UP035 (powercrud's module has them)

from otel_taskctx import context as _context
from otel_taskctx.errors import DescendantConflict
from otel_taskctx.logids import format_ids

log = logging.getLogger("otel_taskctx.compat")

#: the module this one stands in for
POWERCRUD_MODULE = "powercrud.async_context"

try:  # powercrud's own module: stdlib-only, importing it costs nothing
    _powercrud: ModuleType | None = importlib.import_module(POWERCRUD_MODULE)
except ImportError:
    _powercrud = None
if getattr(_powercrud, "__name__", POWERCRUD_MODULE) != POWERCRUD_MODULE:  # this one, reloaded
    _powercrud = _powercrud._powercrud  # type: ignore[union-attr]
#: powercrud's own class when powercrud is installed (equal and ``isinstance`` across both)
TaskContext = getattr(_powercrud, "TaskContext", None) or make_dataclass(
    "TaskContext", [("task_name", str), ("manager_class_path", str | None, None)]
)


def powercrud_module() -> ModuleType | None:
    """powercrud's own ``async_context`` module (also while this one stands in for it)."""
    return _powercrud


@contextmanager
def task_context(task_name: str, manager_class_path: str | None = None) -> Iterator[None]:
    """Context manager to set the current async task metadata (powercrud's signature)."""
    with _context.task_context(task_name, manager_class_path):
        yield


def get_current_task() -> TaskContext | None:
    """The current task as a ``TaskContext`` (``task_name``, ``manager_class_path``), or None."""
    identity = _context.current_task()
    return identity and TaskContext(identity.task_key, identity.manager_class_path)


def skip_nested_async() -> bool:
    """Return True if the current call stack is already inside an async task."""
    return _context.current_task() is not None


def register_descendant_conflicts(model_path: str, ids: Iterable[int]) -> None:
    """powercrud's helper, under the current task: ``int()`` ids, the model label normalised,
    the base ``AsyncManager``'s ``add_conflict_ids``; but a conflict (``False`` or
    :class:`~otel_taskctx.errors.DescendantConflict`) is logged as a warning."""
    current = _context.current_task()
    id_set = {int(pk) for pk in ids if pk is not None} if current else set()
    if not id_set:
        return
    try:
        from django.apps import apps

        model_path = apps.get_model(model_path)._meta.label_lower
    except Exception:  # powercrud's way: a label of no model is kept as it is
        pass
    from powercrud.async_manager import AsyncManager

    try:
        added = AsyncManager().add_conflict_ids(current.task_key, {model_path: id_set})
    except DescendantConflict as exc:
        log.warning("register_descendant_conflicts: %s", exc)
        return
    if added is False:
        log.warning(
            "register_descendant_conflicts: some %s ids %s are locked by another task",
            model_path,
            format_ids(id_set),
        )


def installed() -> bool:
    """True while this module stands in for ``powercrud.async_context``."""
    return sys.modules.get(POWERCRUD_MODULE) is sys.modules[__name__]


def install() -> None:
    """Make ``powercrud.async_context`` (the ``sys.modules`` entry and the package attribute)
    this module. Names imported before stay powercrud's: call it early (``settings.py``)."""
    if _powercrud is None:
        raise ImportError("powercrud is not installed")
    this = sys.modules[__name__]
    sys.modules[POWERCRUD_MODULE] = sys.modules["powercrud"].async_context = this


def uninstall() -> None:
    """Put powercrud's module back wherever this one stands in for it (after :func:`install`
    or a swap by hand); a module that replaced this one since is left alone."""
    this = sys.modules[__name__]
    if sys.modules.get(POWERCRUD_MODULE) is this:
        sys.modules[POWERCRUD_MODULE] = _powercrud
    package = sys.modules.get("powercrud")
    if getattr(package, "async_context", None) is this:
        package.async_context = _powercrud
