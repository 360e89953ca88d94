"""powercrud's conflict cache, kept lock-safe while ``otel_taskctx`` is installed.

:func:`install` (the app's ``ready()``, with ``"powercrud"`` in ``INSTALLED_APPS``) wraps
``AsyncManager.get_cache()`` to return :func:`otel_taskctx.cache.lock_safe` of the cache. On a
cache whose locks cannot be kept (:func:`otel_taskctx.cache.lock_loss`) our wrappers step
aside (:func:`steps_aside`) and powercrud's own code runs unchanged. See docs/conflicts.md.
"""

from __future__ import annotations

from typing import Any

import wrapt

from otel_taskctx.cache import lock_loss, lock_safe, refusal


def _get_cache(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    cache = wrapped(*args, **kwargs)
    return None if cache is None else lock_safe(cache)


def steps_aside(manager: Any) -> bool:
    """True where ``manager``'s cache would lose locks: powercrud's own code runs there."""
    cache = getattr(manager, "cache", None)
    return cache is not None and lock_loss(cache) is not None


def refusal_for_alias() -> str | None:
    """Why powercrud's cache alias cannot hold locks (the full message), or None."""
    from django.core.cache import caches
    from powercrud.conf import get_powercrud_setting

    alias = get_powercrud_setting("CACHE_NAME", "default")
    try:
        return refusal(alias, caches[alias])
    except Exception:  # a missing alias: powercrud's own error says so
        return None


def _async_manager() -> Any:
    from otel_taskctx import hosts

    if not hosts.powercrud_async():  # in INSTALLED_APPS (importable is not enough)
        return None
    from powercrud.async_manager import AsyncManager

    return AsyncManager


class _Wrapper(wrapt.FunctionWrapper):
    """Ours on ``AsyncManager.get_cache``."""


def installed() -> bool:
    manager = _async_manager()
    return manager is not None and isinstance(vars(manager).get("get_cache"), _Wrapper)


def install() -> bool:
    """Wrap powercrud's ``AsyncManager.get_cache`` (once). False without powercrud."""
    manager = _async_manager()
    if manager is None:
        return False
    if not installed():
        manager.get_cache = _Wrapper(vars(manager)["get_cache"], _get_cache)
    return True


def uninstall() -> None:
    """Restore powercrud's own method."""
    if installed():
        manager = _async_manager()
        manager.get_cache = vars(manager)["get_cache"].__wrapped__
