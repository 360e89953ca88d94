"""OpenTelemetry instrumentation for django-q2 and powercrud jobs with task identity.

Usage
-----

Any one of these enables it (they do the same thing, once):

* add ``"otel_taskctx"`` to ``INSTALLED_APPS`` (``OTEL_TASKCTX["AUTO_INSTRUMENT"]``,
  default True, instruments in the app's ``ready()``);
* run the process under ``opentelemetry-instrument`` (entry point ``taskctx`` in the
  ``opentelemetry_instrumentor`` group), e.g.
  ``opentelemetry-instrument python manage.py qcluster``;
* call it yourself::

      from opentelemetry.instrumentation.taskctx import TaskContextInstrumentor

      TaskContextInstrumentor().instrument(tracer_provider=provider)  # provider optional

What it does (see ``docs/instrumentation.md``):

* producer: a PRODUCER span around every ``async_task`` enqueue and the trace context in
  a private key of the task package; a job launched by ``AsyncManager.launch_async_task``
  carries its own signed identity (its task key and manager class path);
* consumer: a CONSUMER span around every run in the worker, with the verified identity
  attached for the run (also in powercrud's ``async_context``) and removed afterwards;
  spans are flushed before a worker process exits;
* inside a verified task, nested ``launch_async_task`` / ``async_task`` calls run inline
  under the parent's task key instead of being enqueued (``allow_nested_async()`` and
  ``OTEL_TASKCTX["ENQUEUE_NESTED"]`` opt out).

If Django is not set up yet when ``instrument()`` runs (``opentelemetry-instrument`` loads
instrumentors before the application starts), patching waits until ``django.setup()``
has finished.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Collection
from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor
from opentelemetry.instrumentation.taskctx import utils
from opentelemetry.instrumentation.taskctx.package import _instruments
from opentelemetry.instrumentation.taskctx.version import __version__

log = logging.getLogger("otel_taskctx.instrumentation")

_DISPATCH_PREFIX = "otel_taskctx.instrumentation"

__all__ = ["TaskContextInstrumentor", "__version__"]


class _Patches:
    """Attribute replacements, restored in reverse order (only where still ours)."""

    def __init__(self) -> None:
        self.items: list[tuple[Any, str, Any, Any, bool]] = []

    def replace(self, target: Any, name: str, replacement: Any) -> Any:
        had = name in vars(target) if isinstance(target, type) else hasattr(target, name)
        original = vars(target)[name] if isinstance(target, type) else getattr(target, name)
        setattr(target, name, replacement)
        self.items.append((target, name, original, replacement, had))
        return original

    def restore(self) -> None:
        while self.items:
            target, name, original, replacement, had = self.items.pop()
            current = (
                vars(target).get(name) if isinstance(target, type) else getattr(target, name, None)
            )
            if current is not replacement:
                log.debug("%r.%s was replaced again after us: left as is", target, name)
                continue
            if had:
                setattr(target, name, original)
            else:  # pragma: no cover - we only replace existing attributes
                delattr(target, name)


def _module_dicts() -> list[tuple[Any, dict[str, Any]]]:
    found = []
    for module in list(sys.modules.values()):
        try:
            namespace = vars(module)
        except TypeError:
            continue
        if isinstance(namespace, dict):
            found.append((module, namespace))
    return found


def _rebind(patches: _Patches, original: Any, replacement: Any) -> int:
    """Point every module-level name bound to ``original`` at ``replacement``.

    This reaches ``from django_q.tasks import async_task`` done before instrumentation
    (powercrud's ``async_manager``, django-q2's scheduler, user modules).
    """
    count = 0
    for module, namespace in _module_dicts():
        for name, value in list(namespace.items()):
            if value is original:
                try:
                    patches.replace(module, name, replacement)
                    count += 1
                except Exception:  # read-only or exotic module objects
                    log.debug("could not rebind %s.%s", getattr(module, "__name__", module), name)
    return count


def _unbind_leftovers(replacement: Any, original: Any) -> None:
    """Modules imported while instrumented copied the wrapper: give them the original."""
    for module, namespace in _module_dicts():
        for name, value in list(namespace.items()):
            if value is replacement:
                try:
                    setattr(module, name, original)
                except Exception:
                    log.debug("could not restore %s.%s", getattr(module, "__name__", module), name)


def _django_models_ready() -> bool:
    try:
        from django.apps import apps
    except ImportError:
        return False
    return bool(apps.models_ready)


#: modules a worker would import at its first job; imported when patching instead, so the
#: worker processes django-q2 forks (and recycles) inherit them
_WORKER_MODULES = (
    "otel_taskctx.helpers",
    "otel_taskctx.conflicts.database_store",
    "otel_taskctx.conflicts.redis_store",
    "powercrud.async_context",
)


def _preload_worker_modules() -> None:
    import importlib

    for name in _WORKER_MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # optional pieces (powercrud) may be missing
            log.debug("could not preload %s", name, exc_info=True)


class TaskContextInstrumentor(BaseInstrumentor):
    """Carries task identity and trace context through django-q2 and powercrud."""

    _patches: _Patches | None = None
    _connected: list[tuple[Any, str]]
    _applied = False
    _deferred = False
    _async_task_wrapper: Any = None
    _async_task_original: Any = None
    _fork_anchor: Any = None

    def instrumentation_dependencies(self) -> Collection[str]:
        return _instruments

    # ------------------------------------------------------------------ lifecycle

    def _instrument(self, **kwargs: Any) -> None:
        provider = kwargs.get("tracer_provider")
        utils.STATE.tracer_provider = provider
        utils.STATE.tracer = trace.get_tracer(
            __name__,
            __version__,
            provider,
            schema_url="https://opentelemetry.io/schemas/1.11.0",
        )
        utils.STATE.active = True
        self._patches = _Patches()
        self._connected = []
        self._applied = False
        if _django_models_ready():
            self._apply()
        else:
            self._defer()

    def _uninstrument(self, **kwargs: Any) -> None:
        utils.STATE.active = False
        for signal, uid in getattr(self, "_connected", []):
            signal.disconnect(dispatch_uid=uid)
        self._connected = []
        if self._patches is not None:
            self._patches.restore()
        from opentelemetry.instrumentation.taskctx import _conflict_log

        _conflict_log.remove_filter()
        if self._async_task_wrapper is not None:
            _unbind_leftovers(self._async_task_wrapper, self._async_task_original)
        self._async_task_wrapper = self._async_task_original = None
        self._fork_anchor = None  # drops the after-fork hook (weakly registered)
        self._applied = False
        self._deferred = False

    def apply_deferred(self) -> bool:
        """Patch now if ``instrument()`` ran before Django was set up. True when patched."""
        if not self.is_instrumented_by_opentelemetry or self._applied:
            return self._applied
        if not _django_models_ready():
            return False
        self._apply()
        return True

    # ------------------------------------------------------------------ patching

    def _defer(self) -> None:
        """Wrap ``django.setup`` so patching happens once the app registry is ready."""
        try:
            import django
        except ImportError:  # pragma: no cover - the dependency check prevents this
            return
        instrumentor = self
        original_setup = django.setup

        def setup(*args: Any, **kwargs: Any) -> Any:
            result = original_setup(*args, **kwargs)
            try:
                instrumentor.apply_deferred()
            except Exception:
                log.exception("otel_taskctx instrumentation could not be applied")
            return result

        setup.__wrapped__ = original_setup  # type: ignore[attr-defined]
        self._patches.replace(django, "setup", setup)
        self._deferred = True

    def _apply(self) -> None:
        from django_q import signals as q_signals
        from django_q import tasks as q_tasks
        from opentelemetry.instrumentation.taskctx import _conflict_log, _consumer, _producer

        patches = self._patches
        assert patches is not None
        self._applied = True

        original = q_tasks.async_task
        if getattr(original, _producer.ORIGINAL_ATTR, None) is not None:
            original = getattr(original, _producer.ORIGINAL_ATTR)  # a stale wrapper of ours
        wrapper = _producer.wrap_async_task(original)
        self._async_task_original, self._async_task_wrapper = original, wrapper
        patches.replace(q_tasks, "async_task", wrapper)
        _rebind(patches, original, wrapper)

        try:
            from powercrud.async_manager import AsyncManager
        except Exception:  # powercrud is optional
            AsyncManager = None
        if AsyncManager is not None:
            launch = vars(AsyncManager)["launch_async_task"]
            patches.replace(
                AsyncManager, "launch_async_task", _producer.wrap_launch_async_task(launch)
            )
            remove = vars(AsyncManager).get("remove_conflict_ids")
            if remove is not None:
                patches.replace(
                    AsyncManager, "remove_conflict_ids", _consumer.wrap_remove_conflict_ids(remove)
                )
            check = vars(AsyncManager).get("check_conflict")
            if check is not None:
                patches.replace(
                    AsyncManager, "check_conflict", _conflict_log.wrap_check_conflict(check)
                )
                _conflict_log.install_filter()

        for signal, receiver, name in (
            (q_signals.pre_enqueue, _producer.on_pre_enqueue, "pre_enqueue"),
            (q_signals.pre_execute, _consumer.on_pre_execute, "pre_execute"),
            (q_signals.post_execute_in_worker, _consumer.on_post_execute, "post_execute"),
            (q_signals.post_spawn, _consumer.on_post_spawn, "post_spawn"),
        ):
            uid = f"{_DISPATCH_PREFIX}.{name}"
            signal.connect(receiver, weak=False, dispatch_uid=uid)
            self._connected.append((signal, uid))

        _preload_worker_modules()

        # every forked child (workers, monitor, pusher) flushes its spans when it exits
        from multiprocessing import util as mp_util

        self._fork_anchor = _ForkAnchor()
        mp_util.register_after_fork(self._fork_anchor, _ForkAnchor.after_fork)


class _ForkAnchor:
    """Weakly referenced by multiprocessing's after-fork registry; dropped on uninstrument."""

    @staticmethod
    def after_fork(anchor: _ForkAnchor) -> None:
        if utils.STATE.active:
            utils.exit_flush.register()
