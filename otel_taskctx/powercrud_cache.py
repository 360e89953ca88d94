"""powercrud's conflict cache, kept lock-safe while ``otel_taskctx`` is installed.

powercrud takes every cache through ``AsyncManager.get_cache()``. With the app installed and
``"powercrud"`` in ``INSTALLED_APPS`` (:meth:`otel_taskctx.apps.OtelTaskCtxConfig.ready`
calls :func:`install`), ``get_cache()`` returns :func:`otel_taskctx.cache.lock_safe` of the
cache: Django's own ``DatabaseCache`` is used through ``LockCache(fallback=<that cache>)``, so
powercrud's locks, tracking sets, progress and active-task keys are rows of our lock model
(never culled) and its other keys go to Django's cache object as before. ``check_conflict``,
``add_conflict_ids``, the completion hook and ``pcrud_cleanup_async`` all see them there.
Every other cache is returned as it is.

On a cache whose locks cannot be made safe (:func:`otel_taskctx.cache.lock_loss`:
FileBasedCache, LocMem, Dummy, a culling ``DatabaseCache`` subclass) otel_taskctx steps aside
(:func:`steps_aside`): powercrud's own methods run on the host's cache with their own
behaviour and return values (``add_conflict_ids`` returns False on a conflict,
``add_active_task`` True or False), and ``manage.py check`` warns what is at risk
(``otel_taskctx.W030``, ``W004``). Only otel_taskctx's own locking (``register_descendants``,
nested launches with ``conflict_ids``) refuses there, with ``ConflictStoreUnavailable``.

This does not depend on the tracing configuration or on the instrumentation being on.
"""

from __future__ import annotations

from typing import Any

import wrapt

from otel_taskctx.cache import lock_loss, lock_safe, refusal


def _get_cache(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    cache = wrapped(*args, **kwargs)
    if cache is None:
        return None
    return lock_safe(cache, instance.get_cache_name())


def steps_aside(manager: Any) -> bool:
    """True where ``manager``'s cache would lose locks (:func:`otel_taskctx.cache.lock_loss`):
    wrappers of powercrud's methods then run powercrud's own code, unchanged."""
    cache = getattr(manager, "cache", None)
    return cache is not None and lock_loss(cache) is not None


def _async_manager() -> Any:
    from otel_taskctx import hosts

    if not hosts.powercrud_async():  # powercrud is optional (and needs django-q2)
        return None
    from powercrud.async_manager import AsyncManager

    return AsyncManager


def refusal_for_alias() -> str | None:
    """Why powercrud's cache alias cannot hold locks (the full message), or None."""
    from django.core.cache import caches
    from powercrud.conf import get_powercrud_setting

    alias = get_powercrud_setting("CACHE_NAME", "default")
    try:
        cache = caches[alias]
    except Exception:  # a missing alias: powercrud's own error says so
        return None
    reason = lock_loss(cache)
    return refusal(alias, cache, reason) if reason else None


#: the wrapper :func:`install` put on ``AsyncManager.get_cache`` (None: not installed)
_installed: Any = None


def installed() -> bool:
    manager = _async_manager()
    return _installed is not None and vars(manager).get("get_cache") is _installed


def install() -> bool:
    """Wrap powercrud's ``AsyncManager.get_cache`` (once). False when powercrud is not in
    ``INSTALLED_APPS`` (importable is not enough: the host does not use it then)."""
    global _installed
    from django.apps import apps

    if not apps.is_installed("powercrud"):
        return False
    manager = _async_manager()
    if manager is None:
        return False
    if not installed():
        wrapt.wrap_function_wrapper(manager, "get_cache", _get_cache)
        _installed = vars(manager)["get_cache"]
    return True


def uninstall() -> None:
    """Restore powercrud's own method."""
    global _installed
    manager = _async_manager()
    if manager is not None and installed():
        manager.get_cache = _installed.__wrapped__
    _installed = None
