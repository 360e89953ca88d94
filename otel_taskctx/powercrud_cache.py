"""powercrud's conflict cache, kept lock-safe while ``otel_taskctx`` is installed.

powercrud takes every cache through ``AsyncManager.get_cache()``. With the app installed
(:meth:`otel_taskctx.apps.OtelTaskCtxConfig.ready` calls :func:`install`):

* ``get_cache()`` returns :func:`otel_taskctx.cache.lock_safe` of the cache: Django's own
  ``DatabaseCache`` is used through :class:`otel_taskctx.cache.DatabaseCache` on the same table,
  so powercrud's locks, tracking sets, progress and active-task keys live in the lock table that
  is never culled. ``check_conflict``, ``add_conflict_ids``, the completion hook and
  ``pcrud_cleanup_async`` all see them there.
* ``add_conflict_ids()`` (the launch-time locks of ``launch_async_task``) raises
  :class:`~otel_taskctx.errors.ConflictStoreUnavailable` on a cache that would lose the locks
  for certain (:func:`otel_taskctx.cache.lock_loss`: FileBasedCache, LocMem, Dummy, a culling
  DatabaseCache subclass), naming the alias, the reason and the settings fix. The launch
  enqueues nothing.

This does not depend on the tracing configuration or on the instrumentation being on.
"""

from __future__ import annotations

from typing import Any

import wrapt

from otel_taskctx.cache import lock_loss, lock_safe, refusal
from otel_taskctx.errors import ConflictStoreUnavailable

_PATCHED = ("get_cache", "add_conflict_ids")


def _get_cache(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    cache = wrapped(*args, **kwargs)
    if cache is None:
        return None
    return lock_safe(cache, instance.get_cache_name())


def _add_conflict_ids(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    cache = instance.cache
    reason = lock_loss(cache) if cache is not None else None
    if reason:
        raise ConflictStoreUnavailable(refusal(instance.cache_name, cache, reason))
    return wrapped(*args, **kwargs)


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


def installed() -> bool:
    manager = _async_manager()
    return manager is not None and isinstance(vars(manager)["get_cache"], wrapt.FunctionWrapper)


def install() -> bool:
    """Wrap powercrud's ``AsyncManager`` (once). False when powercrud is not installed."""
    manager = _async_manager()
    if manager is None:
        return False
    if not installed():
        wrapt.wrap_function_wrapper(manager, "get_cache", _get_cache)
        wrapt.wrap_function_wrapper(manager, "add_conflict_ids", _add_conflict_ids)
    return True


def uninstall() -> None:
    """Restore powercrud's own methods."""
    manager = _async_manager()
    if manager is None:
        return
    for name in _PATCHED:
        current = vars(manager)[name]
        if isinstance(current, wrapt.FunctionWrapper):
            setattr(manager, name, current.__wrapped__)
