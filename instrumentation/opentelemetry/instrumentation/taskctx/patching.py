"""What the instrumentor patches (only what ``INSTALLED_APPS`` uses) and how it is undone
(see docs/instrumentation.md).
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import wrapt
from opentelemetry.instrumentation.taskctx import consumer, fan_out, producer
from opentelemetry.instrumentation.taskctx.tracing import flush_at_exit
from opentelemetry.instrumentation.utils import unwrap

log = logging.getLogger("otel_taskctx.instrumentation")

_DISPATCH_PREFIX = "otel_taskctx.instrumentation"
#: opentelemetry-instrumentation-celery's module, whose receivers ours nest inside
CELERY_OTEL = "opentelemetry.instrumentation.celery"

#: imported when patching, so the workers django-q2 forks inherit them
_WORKER_MODULES = (
    "otel_taskctx.descendants",
    "otel_taskctx.progress",
    "otel_taskctx.conflicts.database_store",
    "otel_taskctx.conflicts.redis_store",
    "powercrud.async_context",
)


def django_models_ready() -> bool:
    from django.apps import apps

    return bool(apps.models_ready)


def _point_names(old: Any, new: Any) -> None:
    """Point every module-level name bound to ``old`` at ``new``."""
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        for name, value in list(namespace.items()) if isinstance(namespace, dict) else ():
            if value is old:
                try:
                    setattr(module, name, new)
                except Exception:  # read-only or exotic module objects
                    log.debug("could not rebind %s.%s", module, name)


#: every wrapper an instrumentor installed and has not removed
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
        #: the post-import hook's handle on these patches (emptied by remove())
        self.celery_hook: list[Any] = [None]

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
        """Wrap what the project uses, connect the signals; all or nothing."""
        from otel_taskctx import hosts

        self.applied = True
        try:
            if hosts.django_q():
                self._apply_django_q()
            if hosts.powercrud_async():
                self._apply_powercrud()
            self._apply_django_tasks()
            self._apply_celery()
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

        wrapper = self.wrap(q_tasks, "async_task", producer.traced_async_task)
        self.async_task = (wrapper.__wrapped__, wrapper)
        _point_names(wrapper.__wrapped__, wrapper)
        self.connect(q_signals.pre_enqueue, producer.on_pre_enqueue, "pre_enqueue")
        self.connect(q_signals.pre_execute, consumer.on_pre_execute, "pre_execute")
        self.connect(q_signals.post_execute_in_worker, consumer.on_post_execute, "post_execute")
        self.connect(q_signals.post_spawn, flush_at_exit, "post_spawn")

    def connect(self, signal: Any, receiver: Any, name: str, sender: Any = None) -> None:
        uid = f"{_DISPATCH_PREFIX}.{name}"
        signal.connect(receiver, sender=sender, weak=False, dispatch_uid=uid)
        self.signals.append((signal, uid, sender))

    def _apply_powercrud(self) -> None:
        """powercrud's ``AsyncManager``."""
        from powercrud.async_manager import AsyncManager

        self.wrap(AsyncManager, "launch_async_task", producer.traced_launch_async_task)
        if "remove_conflict_ids" in vars(AsyncManager):
            self.wrap(AsyncManager, "remove_conflict_ids", consumer.release_through_store)
        if "cleanup_completed_tasks" in vars(AsyncManager):
            self.wrap(AsyncManager, "cleanup_completed_tasks", fan_out.swept_cleanup)

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
        from opentelemetry.instrumentation.taskctx import tasks_producer, tasks_worker

        self.wrap(Task, "enqueue", tasks_producer.traced_enqueue)
        self.wrap(Task, "aenqueue", tasks_producer.traced_aenqueue)
        self.connect(task_signals.task_enqueued, tasks_producer.on_task_enqueued, "task_enqueued")
        self.connect(task_signals.task_started, tasks_worker.on_task_started, "task_started")
        self.connect(task_signals.task_finished, tasks_worker.on_task_finished, "task_finished")
        if hosts.django_tasks_db():  # a fan-out job's result stays RUNNING until its children end
            from django.db.models.signals import pre_save
            from django_tasks_db.models import DBTaskResult

            self.connect(pre_save, tasks_worker.hold_result, "hold_result", DBTaskResult)

    def _apply_celery(self) -> None:
        """Celery, once it is imported (never imported here: a post-import hook waits)."""
        if "celery" in sys.modules:
            self._patch_celery()
            return
        self.celery_hook = hook = [self]

        def imported(module: Any) -> None:
            patches = hook[0]  # None once these patches were removed
            if patches is not None and patches.applied:
                try:
                    patches._patch_celery()
                except Exception:
                    log.exception("otel_taskctx could not instrument Celery")

        wrapt.register_post_import_hook(imported, "celery")

    def _patch_celery(self) -> None:
        """``Task.apply_async`` and ``Celery.send_task`` (the nested-launch policy) and
        Celery's task signals (see docs/celery.md)."""
        from celery import signals as c_signals
        from celery.app.base import Celery
        from celery.app.task import Task
        from opentelemetry.instrumentation.taskctx import celery_producer, celery_worker

        self.wrap(Task, "apply_async", celery_producer.traced_apply_async)
        self.wrap(Celery, "send_task", celery_producer.traced_send_task)
        for signal, receiver, name in (
            (c_signals.before_task_publish, celery_producer.on_before_task_publish, "publish"),
            (c_signals.task_prerun, celery_worker.on_task_prerun, "prerun"),
            (c_signals.task_failure, celery_worker.on_task_failure, "failure"),
            (c_signals.task_postrun, celery_worker.on_task_postrun, "postrun"),
            (c_signals.task_revoked, celery_worker.on_task_revoked, "revoked"),
            (c_signals.worker_ready, celery_worker.on_worker_ready, "ready"),
            (c_signals.task_success, celery_worker.on_task_left, "success"),
            (c_signals.task_retry, celery_worker.on_task_left, "retry"),
        ):
            self.connect(signal, receiver, f"celery_{name}")
        self._after_celery_otel(c_signals.task_prerun, celery_worker.on_task_prerun)

    def _after_celery_otel(self, prerun: Any, receiver: Any) -> None:
        """Keep our ``task_prerun`` receiver after opentelemetry-instrumentation-celery's
        (Celery runs receivers in the order they were connected): its context is entered
        first and ours nests inside it. Instrumented after us, it gets ours connected again
        behind its own (``BaseInstrumentor.instrument`` wrapped, docs/index.md)."""
        from opentelemetry.instrumentation.instrumentor import BaseInstrumentor

        uid = f"{_DISPATCH_PREFIX}.celery_prerun"

        def instrumented(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
            result = wrapped(*args, **kwargs)
            if type(instance).__module__ == CELERY_OTEL and self.applied:
                prerun.disconnect(dispatch_uid=uid)
                prerun.connect(receiver, weak=False, dispatch_uid=uid)
            return result

        self.wrap(BaseInstrumentor, "instrument", instrumented)

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
        self.celery_hook[0] = None
        self.applied = self.deferred = False
