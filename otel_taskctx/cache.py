"""A Django ``DatabaseCache`` that never evicts powercrud's locks.

Django's ``DatabaseCache`` culls a third of its rows whenever it holds more than
``MAX_ENTRIES`` (300 by default), oldest key names first, and powercrud's conflict locks go
with them: a second job could then take objects the first one still edits. This backend keeps
every key that starts with one of ``LOCK_KEY_PREFIXES`` (powercrud's lock keys, tracking sets,
progress and active-task keys) in a table of their own, ``otel_taskctx_lock`` (created by
``migrate``), where only *expired* rows are ever deleted. Every other key behaves exactly as
in Django's backend, culling included. powercrud reads and writes its keys through the normal
cache API, so it sees the same locks as before. With ``otel_taskctx`` installed, a
powercrud cache configured as Django's own ``DatabaseCache`` is used through this backend
(:func:`lock_safe`, see :mod:`otel_taskctx.powercrud_cache`); naming it in settings makes the
same true for every user of the cache alias::

    CACHES = {
        "default": {
            "BACKEND": "otel_taskctx.cache.DatabaseCache",
            "LOCATION": "my_cache_table",          # python manage.py createcachetable
            # optional:
            # "OPTIONS": {"LOCK_TABLE": "otel_taskctx_lock",
            #             "LOCK_KEY_PREFIXES": ["powercrud:conflict:", "powercrud:async:"]},
        }
    }
"""

from __future__ import annotations

from typing import Any

from django.core.cache.backends.base import DEFAULT_TIMEOUT
from django.core.cache.backends.db import DatabaseCache as DjangoDatabaseCache
from django.core.cache.backends.dummy import DummyCache
from django.core.cache.backends.filebased import FileBasedCache
from django.core.cache.backends.locmem import LocMemCache
from django.db import connections

DEFAULT_LOCK_TABLE = "otel_taskctx_lock"
DEFAULT_LOCK_KEY_PREFIXES = ("powercrud:conflict:", "powercrud:async:")
#: rows in the lock table above which a write first deletes the expired ones
LOCK_PURGE_THRESHOLD = 1000


class LockTable(DjangoDatabaseCache):
    """The lock table: a cache table whose ``_cull`` deletes expired rows only."""

    def _cull(self, db: str, cursor: Any, now: Any, num: int) -> None:
        connection = connections[db]
        table = connection.ops.quote_name(self._table)
        expires = connection.ops.quote_name("expires")
        cursor.execute(
            f"DELETE FROM {table} WHERE {expires} < %s",
            [connection.ops.adapt_datetimefield_value(now)],
        )


class DatabaseCache(DjangoDatabaseCache):
    """``DatabaseCache`` that stores lock keys in a lock table that is never culled."""

    def __init__(self, table: str, params: dict[str, Any]) -> None:
        params = dict(params)
        options = dict(params.get("OPTIONS") or {})
        self.lock_table = options.pop("LOCK_TABLE", DEFAULT_LOCK_TABLE)
        prefixes = options.pop("LOCK_KEY_PREFIXES", DEFAULT_LOCK_KEY_PREFIXES)
        if isinstance(prefixes, str):
            prefixes = [prefixes]
        self.lock_key_prefixes: tuple[str, ...] = tuple(prefixes)
        params["OPTIONS"] = options
        super().__init__(table, params)
        lock_options = dict(options, MAX_ENTRIES=LOCK_PURGE_THRESHOLD)
        self.locks = LockTable(self.lock_table, dict(params, OPTIONS=lock_options))

    def is_lock_key(self, key: Any) -> bool:
        return isinstance(key, str) and key.startswith(self.lock_key_prefixes)

    def storage_for(self, key: str) -> DjangoDatabaseCache:
        """The table (as a DatabaseCache) that holds ``key``: the lock table or this one."""
        return self.locks if self.is_lock_key(key) else self

    # routing: lock keys to the lock table, everything else to Django's implementation -------
    def get_many(self, keys, version=None):  # type: ignore[no-untyped-def]
        keys = list(keys)
        locks = [k for k in keys if self.is_lock_key(k)]
        others = [k for k in keys if not self.is_lock_key(k)]
        result = super().get_many(others, version) if others else {}
        if locks:
            result.update(self.locks.get_many(locks, version))
        return result

    def set(self, key, value, timeout=DEFAULT_TIMEOUT, version=None):  # type: ignore[no-untyped-def]
        if self.is_lock_key(key):
            return self.locks.set(key, value, timeout, version)
        return super().set(key, value, timeout, version)

    def add(self, key, value, timeout=DEFAULT_TIMEOUT, version=None):  # type: ignore[no-untyped-def]
        if self.is_lock_key(key):
            return self.locks.add(key, value, timeout, version)
        return super().add(key, value, timeout, version)

    def touch(self, key, timeout=DEFAULT_TIMEOUT, version=None):  # type: ignore[no-untyped-def]
        if self.is_lock_key(key):
            return self.locks.touch(key, timeout, version)
        return super().touch(key, timeout, version)

    def delete(self, key, version=None):  # type: ignore[no-untyped-def]
        if self.is_lock_key(key):
            return self.locks.delete(key, version)
        return super().delete(key, version)

    def has_key(self, key, version=None):  # type: ignore[no-untyped-def]
        if self.is_lock_key(key):
            return self.locks.has_key(key, version)
        return super().has_key(key, version)

    def delete_many(self, keys, version=None):  # type: ignore[no-untyped-def]
        keys = list(keys)
        locks = [k for k in keys if self.is_lock_key(k)]
        others = [k for k in keys if not self.is_lock_key(k)]
        if others:
            super().delete_many(others, version)
        if locks:
            self.locks.delete_many(locks, version)

    def clear(self) -> None:
        super().clear()
        self.locks.clear()


# --- which caches keep conflict locks -------------------------------------------------------
_LOCK_SAFE_ATTR = "_otel_taskctx_lock_safe"
#: Django's own backend, which powercrud uses through :func:`lock_safe`
DJANGO_DATABASE_CACHE = "django.core.cache.backends.db.DatabaseCache"
LOCK_SAFE_BACKEND = f"{__name__}.DatabaseCache"


def lock_safe(cache: Any, alias: str) -> Any:
    """``cache`` (the cache of ``alias``), or a view of it that keeps conflict locks.

    Django's own ``DatabaseCache`` culls live locks with its other entries; for it this returns
    a :class:`DatabaseCache` on the same table and settings (one per cache object, so one per
    thread, as Django's), whose lock keys live in the lock table that is never culled. Every
    other cache is returned as it is.
    """
    if type(cache) is not DjangoDatabaseCache:
        return cache
    safe = vars(cache).get(_LOCK_SAFE_ATTR)
    if safe is None:
        from django.core.cache import caches

        params = dict(caches.settings.get(alias) or {})
        backend = params.pop("BACKEND", "")
        location = params.pop("LOCATION", "")
        if backend != DJANGO_DATABASE_CACHE or location != cache._table:
            return cache  # not the alias's own cache object: leave it alone
        safe = DatabaseCache(location, params)
        vars(cache)[_LOCK_SAFE_ATTR] = safe
    return safe


#: what :func:`backend_kind` says of a cache backend class
KINDS = (
    "lock-safe",  # otel_taskctx.cache.DatabaseCache (or a subclass): locks never culled
    "database",  # Django's own DatabaseCache: powercrud uses it through the lock-safe view
    "culling-database",  # another DatabaseCache subclass: culls live locks at MAX_ENTRIES
    "filebased",  # FileBasedCache: culls files at MAX_ENTRIES, add() is not atomic
    "locmem",  # LocMemCache: one process
    "dummy",  # DummyCache: stores nothing
    "memcached",  # Django's memcached backends: evict least recently used items when full
    "redis",  # Django's RedisCache or django-redis: keeps keys unless the server evicts
    "other",
)


def _is_redis(backend: type) -> bool:
    from django.core.cache.backends.redis import RedisCache

    if issubclass(backend, RedisCache):
        return True
    if not any(c.__module__.startswith("django_redis.") for c in backend.__mro__):
        return False  # no need to import django-redis (and redis) for other caches
    try:
        from django_redis.cache import RedisCache as DjangoRedisCache
    except ImportError:  # pragma: no cover - a django_redis class without django_redis
        return False
    return issubclass(backend, DjangoRedisCache)


def backend_kind(backend: type) -> str:
    """Which of :data:`KINDS` the cache backend class ``backend`` is, by its class (its
    bases), never by its name."""
    from django.core.cache.backends.memcached import BaseMemcachedCache

    if issubclass(backend, DatabaseCache):
        return "lock-safe"
    if backend is DjangoDatabaseCache:
        return "database"
    for base, kind in (
        (DjangoDatabaseCache, "culling-database"),
        (FileBasedCache, "filebased"),
        (LocMemCache, "locmem"),
        (DummyCache, "dummy"),
        (BaseMemcachedCache, "memcached"),
    ):
        if issubclass(backend, base):
            return kind
    return "redis" if _is_redis(backend) else "other"


def lock_loss(cache: Any) -> str | None:
    """Why ``cache`` would lose conflict locks for certain, or None where it keeps them.

    Caches that evict only under memory pressure (Redis with an evicting ``maxmemory-policy``,
    Memcached) are not certain to: the system checks warn about those. On a cache that
    would lose them, otel_taskctx's own locking (``register_descendants``, nested launches
    with ``conflict_ids``) refuses, and powercrud's own calls run unchanged
    (:mod:`otel_taskctx.powercrud_cache`).
    """
    kind = backend_kind(type(cache))
    if kind in ("database", "culling-database"):
        return (
            f"it deletes a third of its entries, oldest keys first, whenever it holds more "
            f"than MAX_ENTRIES ({cache._max_entries}), live locks with them"
        )
    if kind == "filebased":
        return (
            f"it deletes a random share of its files whenever it holds more than MAX_ENTRIES "
            f"({cache._max_entries}), live locks with them, and its add() is not atomic"
        )
    if kind == "locmem":
        return (
            "it lives in one process: locks taken in a worker are invisible to the web "
            "process and to the other workers"
        )
    if kind == "dummy":
        return "it stores nothing"
    return None


def refusal(alias: str, cache: Any, reason: str) -> str:
    """The message of a refused lock: the cache alias, the reason and the settings fix."""
    path = f"{type(cache).__module__}.{type(cache).__qualname__}"
    return (
        f"cache {alias!r} ({path}) cannot hold conflict locks: {reason}. Nothing was locked. "
        f"Fix: CACHES[{alias!r}]['BACKEND'] = '{LOCK_SAFE_BACKEND}' (then run "
        "'manage.py createcachetable' and 'manage.py migrate'), or a django-redis cache."
    )
