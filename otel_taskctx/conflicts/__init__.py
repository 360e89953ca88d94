"""The conflict store for descendant objects: powercrud's lock keys, reserved all-or-nothing.

:func:`get_conflict_store` picks the backend for the manager's cache: Lua scripts on
django-redis (:mod:`.redis_store`), our lock model through the ORM (:mod:`.database_store`),
or any cache key by key (:mod:`.base`). See docs/conflicts.md.
"""

from __future__ import annotations

from typing import Any

from otel_taskctx.conflicts.base import CacheConflictStore, lock_ttl
from otel_taskctx.conflicts.base import Reservation as Reservation
from otel_taskctx.conflicts.keepalive import keep_locks_alive as keep_locks_alive

BACKENDS = ("redis", "database", "cache")


def backend_for(manager: Any) -> str:
    """``"redis"``, ``"database"`` or ``"cache"`` (the generic path) for ``manager.cache``."""
    from otel_taskctx.conflicts import database_store, redis_store

    if redis_store.supports(manager.cache):
        return "redis"
    return "database" if database_store.supports(manager.cache, manager) else "cache"


def get_conflict_store(
    manager: Any, backend: str | None = None, ttl: int | None = None
) -> CacheConflictStore:
    """The conflict store for ``manager``'s cache, shared by the managers of one cache object
    with the same prefixes and TTL (kept on the cache object: Django's are per thread).
    ``backend`` forces one of :data:`BACKENDS`; ``ttl`` overrides :func:`lock_ttl`."""
    if backend is None and ttl is None:
        shared = vars(manager.cache).setdefault("_otel_taskctx_conflict_stores", {})
        key = (manager.conflict_model_prefix, manager.conflict_prefix, lock_ttl(manager))
        if key not in shared:
            shared[key] = get_conflict_store(manager, backend_for(manager))
        return shared[key]
    kind = backend or backend_for(manager)
    if kind == "redis":
        from otel_taskctx.conflicts.redis_store import RedisConflictStore as store_class
    elif kind == "database":
        from otel_taskctx.conflicts.database_store import DatabaseConflictStore as store_class
    elif kind == "cache":
        store_class = CacheConflictStore
    else:
        raise ValueError(f"unknown conflict store backend {kind!r}; use one of {BACKENDS}")
    return store_class(manager, ttl)


def release_locks(task_key: str, manager: Any = None) -> int:
    """Release every lock ``task_key`` still holds (compare-and-delete). Returns the count."""
    if manager is None:
        from powercrud.async_manager import AsyncManager

        manager = AsyncManager()
    return get_conflict_store(manager).release(task_key)
