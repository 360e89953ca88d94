"""The conflict store for descendant objects: powercrud's lock keys, reserved all-or-nothing.

Locks use powercrud's own format, so its ``check_conflict`` sees them and its completion hook
(``remove_conflict_ids``) and cleanup command release them with the task's other locks:

* lock key ``powercrud:conflict:model:<app_label.modelname>:<id>`` -> holder task key
* tracking set ``powercrud:async:conflict:<task key>`` -> set of lock keys

Unlike powercrud's ``add_conflict_ids``, a reservation is atomic and batched (one Lua script
per few thousand keys on Redis, set-based SQL on the DatabaseCache), re-entrant (ids the task
already holds are fine and never rolled back), accepts int/str/UUID keys, keeps the tracking
set consistent under concurrent registration and names the holder task on conflict.
:meth:`~CacheConflictStore.release` only deletes locks the task still holds.

:func:`get_conflict_store` picks the backend for the manager's cache. Importing this package
needs no Django; the backends import it when they are built.
"""

from __future__ import annotations

from typing import Any

from otel_taskctx.conflicts.base import (
    CacheConflictStore,
    Reservation,
    lock_ttl,
    normalise_ids,
)
from otel_taskctx.conflicts.keepalive import LockKeeper, keep_locks_alive
from otel_taskctx.conflicts.tracking import encode_tracking

BACKENDS = ("redis", "database", "cache")
_STORE_ATTR = "_otel_taskctx_conflict_store"


def backend_for(manager: Any) -> str:
    """``"redis"``, ``"database"`` or ``"cache"`` (generic per-key path) for ``manager.cache``."""
    from otel_taskctx.conflicts import database_store, redis_store

    cache = manager.cache
    if redis_store.supports(cache):
        return "redis"
    if database_store.supports(cache, manager):
        return "database"
    return "cache"


def get_conflict_store(
    manager: Any, backend: str | None = None, ttl: int | None = None
) -> CacheConflictStore:
    """The conflict store for ``manager``'s cache (cached on the manager, and shared by the
    managers of one cache object with the same prefixes and lock TTL).

    ``backend`` forces one of :data:`BACKENDS` (``"cache"`` works with every cache); ``ttl``
    overrides the lock TTL (default ``OTEL_TASKCTX["LOCK_TTL"]`` or powercrud's
    ``CONFLICT_TTL``).
    """
    shared_key = None
    if backend is None and ttl is None:
        store = getattr(manager, _STORE_ATTR, None)
        if store is not None and store.cache is manager.cache:
            return store
        # managers come and go (powercrud builds one per completion hook): their stores are
        # shared by cache object, prefixes and TTL, so a hook does not rebuild one every time
        shared_key = (manager.conflict_model_prefix, manager.conflict_prefix, lock_ttl(manager))
        store = _shared_stores(manager.cache).get(shared_key)
        if store is not None:
            _remember(manager, store)
            return store
    kind = backend or backend_for(manager)
    if kind == "redis":
        from otel_taskctx.conflicts.redis_store import RedisConflictStore

        store = RedisConflictStore(manager, ttl)
    elif kind == "database":
        from otel_taskctx.conflicts.database_store import DatabaseConflictStore

        store = DatabaseConflictStore(manager, ttl)
    elif kind == "cache":
        store = CacheConflictStore(manager, ttl)
    else:
        raise ValueError(f"unknown conflict store backend {kind!r}; use one of {BACKENDS}")
    if shared_key is not None:
        _shared_stores(manager.cache)[shared_key] = store
        _remember(manager, store)
    return store


_CACHE_ATTR = "_otel_taskctx_conflict_stores"


def _shared_stores(cache: Any) -> dict[tuple[Any, ...], CacheConflictStore]:
    """``{(lock prefix, tracking prefix, TTL): store}`` kept on the cache object itself, so it
    lives exactly as long as the cache (Django's cache objects are per thread: a store is
    never shared between threads, and a finished thread's stores go with its caches)."""
    stores = getattr(cache, _CACHE_ATTR, None)
    if stores is None:
        stores = {}
        try:
            setattr(cache, _CACHE_ATTR, stores)
        except AttributeError:  # pragma: no cover - a cache object with __slots__: no sharing
            pass
    return stores


def _remember(manager: Any, store: CacheConflictStore) -> None:
    try:
        setattr(manager, _STORE_ATTR, store)
    except AttributeError:  # pragma: no cover - a manager with __slots__
        pass


def release_locks(task_key: str, manager: Any = None) -> int:
    """Release every lock ``task_key`` still holds (compare-and-delete). Returns the count."""
    if manager is None:
        from powercrud.async_manager import AsyncManager

        manager = AsyncManager()
    return get_conflict_store(manager).release(task_key)


__all__ = [
    "BACKENDS",
    "CacheConflictStore",
    "LockKeeper",
    "Reservation",
    "backend_for",
    "encode_tracking",
    "get_conflict_store",
    "keep_locks_alive",
    "lock_ttl",
    "normalise_ids",
    "release_locks",
]
