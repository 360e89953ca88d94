"""What the instrumentor patches, and how it is undone.

* Only what the project uses, asked of ``INSTALLED_APPS`` (:mod:`otel_taskctx.hosts`): an
  optional package that is importable but not installed as an app is never imported.
* ``django_q.tasks.async_task`` and powercrud's ``AsyncManager.launch_async_task`` /
  ``remove_conflict_ids`` / ``check_conflict`` / ``cleanup_completed_tasks``: wrapt function
  wrappers
  (``wrap_function_wrapper``), removed with
  ``opentelemetry.instrumentation.utils.unwrap``, as in opentelemetry-python-contrib.
* Module-level copies of ``async_task`` made by ``from django_q.tasks import async_task``
  before instrumentation (powercrud's ``async_manager``, django-q2's scheduler, user modules)
  are pointed at the wrapper, and back at the original afterwards.
* django-q2's signals: ``pre_enqueue``, ``pre_execute``, ``post_execute_in_worker``,
  ``post_spawn``, connected with a dispatch uid.
* Django's task framework (``django.tasks``, Django 6+): ``Task.enqueue`` and ``aenqueue``
  wrapped, ``task_enqueued`` / ``task_started`` / ``task_finished`` connected, and with
  django_tasks_db the ``pre_save`` of its ``DBTaskResult`` (see ``_django_tasks`` and
  ``_tasks_worker``).
* If Django's app registry is not ready (``opentelemetry-instrument`` loads instrumentors
  before the application starts), ``django.setup`` is wrapped and patching waits until it
  has finished.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import wrapt
from opentelemetry.instrumentation.taskctx import (
    _conflict_log,
    _consumer,
    _fan_out,
    _producer,
    utils,
)
from opentelemetry.instrumentation.utils import unwrap

log = logging.getLogger("otel_taskctx.instrumentation")

_DISPATCH_PREFIX = "otel_taskctx.instrumentation"

#: modules a worker would import at its first job; imported when patching instead, so the
#: worker processes django-q2 forks (and recycles) inherit them
_WORKER_MODULES = (
    "otel_taskctx.descendants",
    "otel_taskctx.progress",
    "otel_taskctx.conflicts.database_store",
    "otel_taskctx.conflicts.redis_store",
    "powercrud.async_context",
)


def django_models_ready() -> bool:
    try:
        from django.apps import apps
    except ImportError:
        return False
    return bool(apps.models_ready)


def _module_namespaces() -> list[tuple[Any, dict[str, Any]]]:
    found = []
    for module in list(sys.modules.values()):
        try:
            namespace = vars(module)
        except TypeError:
            continue
        if isinstance(namespace, dict):
            found.append((module, namespace))
    return found


def _point_names(old: Any, new: Any) -> list[tuple[Any, str]]:
    """Point every module-level name bound to ``old`` at ``new``; the names changed."""
    changed = []
    for module, namespace in _module_namespaces():
        for name, value in list(namespace.items()):
            if value is old:
                try:
                    setattr(module, name, new)
                    changed.append((module, name))
                except Exception:  # read-only or exotic module objects
                    log.debug("could not rebind %s.%s", getattr(module, "__name__", module), name)
    return changed


#: every wrapper an instrumentor installed and has not removed (by identity: wrapt's own
#: record of the wrapper function is private)
_installed: list[Any] = []


def _forget(wrapper: Any) -> None:
    _installed[:] = [w for w in _installed if w is not wrapper]


class Patches:
    """The patches one instrumentor applied, undone in reverse order."""

    def __init__(self) -> None:
        self.wrapped: list[tuple[Any, str, Any]] = []
        self.signals: list[tuple[Any, str, Any]] = []
        self.async_task: tuple[Any, Any] | None = None  # (original, wrapper)
        self.applied = False
        self.deferred = False

    def wrap(self, target: Any, name: str, wrapper: Any) -> Any:
        current = vars(target)[name] if isinstance(target, type) else getattr(target, name)
        if any(current is ours for ours in _installed):
            unwrap(target, name)  # a stale wrapper of ours (an instrumentor not uninstrumented)
            _forget(current)
        wrapt.wrap_function_wrapper(target, name, wrapper)
        installed = vars(target)[name] if isinstance(target, type) else getattr(target, name)
        self.wrapped.append((target, name, installed))
        _installed.append(installed)
        return installed

    def apply(self) -> None:
        """Wrap what the project uses (asked of ``INSTALLED_APPS``), connect the signals.

        All or nothing: a patch that fails undoes the ones before it and raises.
        """
        from otel_taskctx import hosts

        self.applied = True
        try:
            if hosts.django_q():
                self._apply_django_q()
            if hosts.powercrud_async():
                self._apply_powercrud()
            self._apply_django_tasks()
        except BaseException:
            self.remove()
            raise
        for module in _WORKER_MODULES:
            if module.startswith("powercrud.") and not hosts.powercrud_async():
                continue
            try:
                importlib.import_module(module)
            except Exception:
                log.debug("could not preload %s", module, exc_info=True)

    def _apply_django_q(self) -> None:
        """django-q2's ``async_task`` (and copies of it) and its signals."""
        from django_q import signals as q_signals
        from django_q import tasks as q_tasks

        wrapper = self.wrap(q_tasks, "async_task", _producer.traced_async_task)
        self.async_task = (wrapper.__wrapped__, wrapper)
        _point_names(wrapper.__wrapped__, wrapper)
        for signal, receiver, name in (
            (q_signals.pre_enqueue, _producer.on_pre_enqueue, "pre_enqueue"),
            (q_signals.pre_execute, _consumer.on_pre_execute, "pre_execute"),
            (q_signals.post_execute_in_worker, _consumer.on_post_execute, "post_execute"),
            (q_signals.post_spawn, _consumer.on_post_spawn, "post_spawn"),
        ):
            uid = f"{_DISPATCH_PREFIX}.{name}"
            signal.connect(receiver, weak=False, dispatch_uid=uid)
            self.signals.append((signal, uid, None))

    def _apply_powercrud(self) -> None:
        """powercrud's ``AsyncManager``."""
        from powercrud.async_manager import AsyncManager

        self.wrap(AsyncManager, "launch_async_task", _producer.traced_launch_async_task)
        if "remove_conflict_ids" in vars(AsyncManager):
            self.wrap(AsyncManager, "remove_conflict_ids", _consumer.release_through_store)
        if "cleanup_completed_tasks" in vars(AsyncManager):
            self.wrap(AsyncManager, "cleanup_completed_tasks", _fan_out.swept_cleanup)
        if "check_conflict" in vars(AsyncManager):
            self.wrap(AsyncManager, "check_conflict", _conflict_log.capped_check_conflict)
            _conflict_log.install_filter()

    def _apply_django_tasks(self) -> None:
        """Django's task framework (``OTEL_TASKCTX["DJANGO_TASKS"]``, Django 6+)."""
        from otel_taskctx import hosts
        from otel_taskctx.conf import get_setting

        try:
            if not get_setting("DJANGO_TASKS"):
                return
            from django.tasks import signals as task_signals
            from django.tasks.base import Task
        except ImportError:  # Django before 6.0
            return
        from opentelemetry.instrumentation.taskctx import _django_tasks, _tasks_worker

        self.wrap(Task, "enqueue", _django_tasks.traced_enqueue)
        self.wrap(Task, "aenqueue", _django_tasks.traced_aenqueue)
        connect = [
            (task_signals.task_enqueued, _django_tasks.on_task_enqueued, "task_enqueued", None),
            (task_signals.task_started, _tasks_worker.on_task_started, "task_started", None),
            (task_signals.task_finished, _tasks_worker.on_task_finished, "task_finished", None),
        ]
        if hosts.django_tasks_db():  # a fan-out job's result stays RUNNING until its children end
            from django.db.models.signals import pre_save
            from django_tasks_db.models import DBTaskResult

            connect.append((pre_save, _tasks_worker.hold_result, "hold_result", DBTaskResult))
        for signal, receiver, name, sender in connect:
            uid = f"{_DISPATCH_PREFIX}.{name}"
            signal.connect(receiver, sender=sender, weak=False, dispatch_uid=uid)
            self.signals.append((signal, uid, sender))

    def defer(self, ready: Any) -> None:
        """Wrap ``django.setup`` so that ``ready()`` runs once the app registry is ready."""
        import django

        def after_setup(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
            result = wrapped(*args, **kwargs)
            try:
                ready()
            except Exception:
                log.exception("otel_taskctx instrumentation could not be applied")
            return result

        self.wrap(django, "setup", after_setup)
        self.deferred = True

    def remove(self) -> None:
        """Undo every patch that is still ours; copies of the wrapper get the original."""
        for signal, uid, sender in self.signals:
            signal.disconnect(sender=sender, dispatch_uid=uid)
        self.signals = []
        _conflict_log.remove_filter()
        while self.wrapped:
            target, name, installed = self.wrapped.pop()
            current = vars(target).get(name) if isinstance(target, type) else getattr(target, name)
            _forget(installed)
            if current is installed:
                unwrap(target, name)
            else:
                log.debug("%r.%s was replaced again after us: left as is", target, name)
        if self.async_task is not None:
            original, wrapper = self.async_task
            _point_names(wrapper, original)
            self.async_task = None
        self.applied = self.deferred = False


def flush_spans_after_fork(anchor: Any) -> None:
    """multiprocessing's after-fork hook: every forked child flushes its spans at exit."""
    if utils.STATE.active:
        utils.exit_flush.register()
