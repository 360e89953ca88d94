"""A cache backend that keeps powercrud's locks on a model of our own, never culled.

Django's ``DatabaseCache`` culls a third of its rows whenever it holds more than
``MAX_ENTRIES``, oldest keys first, live locks with them. :class:`LockCache` (the public
``BaseCache`` API) keeps keys that start with ``LOCK_KEY_PREFIXES`` (powercrud's locks,
tracking sets, progress, active tasks) as rows of :class:`otel_taskctx.models.DescendantLock`,
written through the ORM, where only expired rows are deleted; every other key goes to the
``fallback`` cache's own methods. powercrud's Django ``DatabaseCache`` is used through
``LockCache(fallback=<it>)`` (:func:`lock_safe`, :mod:`otel_taskctx.powercrud_cache`);
``"BACKEND": "otel_taskctx.cache.DatabaseCache"`` in ``CACHES`` does the same for every user
of the alias (Django's ``DatabaseCache`` on ``LOCATION`` for the other keys).
"""

from __future__ import annotations

import base64
import pickle
import threading
import time
from datetime import UTC, datetime
from typing import Any

from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache
from django.core.cache.backends.db import BaseDatabaseCache
from django.core.cache.backends.db import DatabaseCache as DjangoDatabaseCache
from django.core.cache.backends.dummy import DummyCache
from django.core.cache.backends.filebased import FileBasedCache
from django.core.cache.backends.locmem import LocMemCache
from django.utils.timezone import now

DEFAULT_LOCK_KEY_PREFIXES = ("powercrud:conflict:", "powercrud:async:")
#: seconds between two deletions of expired lock rows (per process and database)
PURGE_INTERVAL = 300.0
_purged: dict[str, float] = {}
_purge_lock = threading.Lock()


def lock_db() -> str:
    """The database alias the lock rows are written to (the routers decide)."""
    from django.db import router

    from otel_taskctx.models import DescendantLock

    return router.db_for_write(DescendantLock)


def locks(db: str | None = None) -> Any:
    """``DescendantLock.objects`` on the lock database."""
    from otel_taskctx.models import DescendantLock

    return DescendantLock.objects.using(db or lock_db())


def encode(value: Any) -> str:
    """A row's ``value``: ``base64(pickle(value))``, as Django's DatabaseCache encodes it."""
    return base64.b64encode(pickle.dumps(value, pickle.HIGHEST_PROTOCOL)).decode("latin1")


def decode(text: str) -> Any:
    return pickle.loads(base64.b64decode(text.encode()))


def purge_expired(db: str | None = None) -> None:
    """Now and then (every :data:`PURGE_INTERVAL` s per process), delete expired lock rows."""
    db = db or lock_db()
    moment = time.monotonic()
    with _purge_lock:
        if moment - _purged.get(db, float("-inf")) < PURGE_INTERVAL:
            return
        _purged[db] = moment
    locks(db).filter(expires__lt=now()).delete()


class LockCache(BaseCache):
    """A Django cache whose lock keys are :class:`~otel_taskctx.models.DescendantLock` rows.

    ``fallback`` (a cache object) gets every other key; without one, every key is a row.
    ``OPTIONS["LOCK_KEY_PREFIXES"]`` names the lock keys (default powercrud's
    ``powercrud:conflict:`` and ``powercrud:async:``). Keys are made with this cache's
    ``KEY_PREFIX``, ``VERSION`` and ``KEY_FUNCTION`` (a view takes the fallback's).
    """

    def __init__(self, location: str = "", params: Any = None, *, fallback: Any = None) -> None:
        params = params or {}
        BaseCache.__init__(self, params)
        options = params.get("OPTIONS") or {}
        prefixes = options.get("LOCK_KEY_PREFIXES", DEFAULT_LOCK_KEY_PREFIXES)
        self.lock_key_prefixes = (prefixes,) if isinstance(prefixes, str) else tuple(prefixes)
        self.fallback = fallback
        if fallback is not None:  # the same keys as the cache it stands in front of
            for name in ("default_timeout", "key_prefix", "version", "key_func"):
                setattr(self, name, getattr(fallback, name))

    def is_lock_key(self, key: Any) -> bool:
        return self.fallback is None or (
            isinstance(key, str) and key.startswith(self.lock_key_prefixes)
        )

    def expiry(self, timeout: Any = DEFAULT_TIMEOUT) -> datetime:
        """A row's ``expires`` for ``timeout``, in whole seconds, as Django's DatabaseCache."""
        from django.conf import settings

        timestamp, tz = self.get_backend_timeout(timeout), UTC if settings.USE_TZ else None
        if timestamp is None:
            return datetime.max.replace(microsecond=0, tzinfo=tz)
        return datetime.fromtimestamp(int(timestamp), tz=tz)

    def _split(self, keys: Any) -> tuple[list[Any], list[Any]]:
        split: tuple[list[Any], list[Any]] = ([], [])
        for key in keys:
            split[not self.is_lock_key(key)].append(key)
        return split

    # reads -----------------------------------------------------------------------------------
    def get(self, key, default=None, version=None):  # type: ignore[no-untyped-def]
        if not self.is_lock_key(key):
            return self.fallback.get(key, default, version)
        return self.get_many([key], version).get(key, default)

    def get_many(self, keys, version=None):  # type: ignore[no-untyped-def]
        mine, others = self._split(keys)
        found = self.fallback.get_many(others, version) if others else {}
        if mine:
            by_db_key = {self.make_and_validate_key(k, version): k for k in mine}
            moment, expired = now(), []
            rows = locks().filter(cache_key__in=list(by_db_key))
            for db_key, value, expires in rows.values_list("cache_key", "value", "expires"):
                if expires < moment:
                    expired.append(db_key)
                else:
                    found[by_db_key[db_key]] = decode(value)
            if expired:  # as Django's DatabaseCache does: an expired row read is deleted
                locks().filter(cache_key__in=expired, expires__lt=moment).delete()
        return found

    # writes ----------------------------------------------------------------------------------
    def set(self, key, value, timeout=DEFAULT_TIMEOUT, version=None):  # type: ignore[no-untyped-def]
        if not self.is_lock_key(key):
            return self.fallback.set(key, value, timeout, version)
        from otel_taskctx.models import DescendantLock

        row = DescendantLock(
            cache_key=self.make_and_validate_key(key, version),
            value=encode(value),
            expires=self.expiry(timeout),
        )
        locks().bulk_create(
            [row],
            update_conflicts=True,
            unique_fields=["cache_key"],
            update_fields=["value", "expires"],
        )
        purge_expired()

    def add(self, key, value, timeout=DEFAULT_TIMEOUT, version=None):  # type: ignore[no-untyped-def]
        """Set ``key`` if it is absent or expired; atomic across processes (the insert fails
        on the primary key when another one got there first)."""
        if not self.is_lock_key(key):
            return self.fallback.add(key, value, timeout, version)
        from django.db import IntegrityError, transaction

        db = lock_db()
        db_key = self.make_and_validate_key(key, version)
        try:
            with transaction.atomic(using=db):
                locks(db).filter(cache_key=db_key, expires__lt=now()).delete()
                locks(db).create(
                    cache_key=db_key, value=encode(value), expires=self.expiry(timeout)
                )
        except IntegrityError:
            return False
        purge_expired(db)
        return True

    def touch(self, key, timeout=DEFAULT_TIMEOUT, version=None):  # type: ignore[no-untyped-def]
        if not self.is_lock_key(key):
            return self.fallback.touch(key, timeout, version)
        db_key = self.make_and_validate_key(key, version)
        rows = locks().filter(cache_key=db_key, expires__gte=now())
        return bool(rows.update(expires=self.expiry(timeout)))

    def delete(self, key, version=None):  # type: ignore[no-untyped-def]
        if not self.is_lock_key(key):
            return self.fallback.delete(key, version)
        db_key = self.make_and_validate_key(key, version)
        return bool(locks().filter(cache_key=db_key).delete()[0])

    def delete_many(self, keys, version=None):  # type: ignore[no-untyped-def]
        mine, others = self._split(keys)
        if others:
            self.fallback.delete_many(others, version)
        if mine:
            db_keys = [self.make_and_validate_key(k, version) for k in mine]
            locks().filter(cache_key__in=db_keys).delete()

    def clear(self) -> None:
        """Clear the fallback cache and every lock row (as Django's ``clear`` its table)."""
        if self.fallback is not None:
            self.fallback.clear()
        locks().all().delete()


class DatabaseCache(LockCache, BaseDatabaseCache):
    """For ``CACHES``: Django's ``DatabaseCache`` on ``LOCATION`` for ordinary keys (culled
    as before; ``createcachetable`` creates its table), lock keys in the lock model."""

    def __init__(self, table: str, params: dict[str, Any]) -> None:
        BaseDatabaseCache.__init__(self, table, params)
        LockCache.__init__(self, table, params, fallback=DjangoDatabaseCache(table, params))


# --- which caches keep conflict locks -------------------------------------------------------
_LOCK_SAFE_ATTR = "_otel_taskctx_lock_safe"
LOCK_SAFE_BACKEND = f"{__name__}.DatabaseCache"


def lock_safe(cache: Any, alias: str | None = None) -> Any:
    """``cache``, or a view of it that keeps conflict locks.

    Django's own ``DatabaseCache`` culls live locks with its other entries; for it this returns
    ``LockCache(fallback=cache)`` (one per cache object, so one per thread, as Django's): its
    lock keys are rows of the lock model, every other key goes to ``cache`` itself. Every
    other cache is returned as it is. (``alias`` is accepted for callers of the former
    signature, and unused.)
    """
    if type(cache) is not DjangoDatabaseCache:
        return cache
    safe = vars(cache).get(_LOCK_SAFE_ATTR)
    if safe is None:
        safe = LockCache(fallback=cache)
        vars(cache)[_LOCK_SAFE_ATTR] = safe
    return safe


#: what :func:`backend_kind` says of a cache backend class
KINDS = (
    "lock-safe",  # otel_taskctx.cache.LockCache (DatabaseCache, or a subclass): never culled
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

    if issubclass(backend, LockCache):
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


_CULLS = "whenever it holds more than its MAX_ENTRIES (OPTIONS; 300 by default)"


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
            f"it deletes a third of its entries, oldest keys first, {_CULLS}, live locks with them"
        )
    if kind == "filebased":
        return (
            f"it deletes a random share of its files {_CULLS}, live locks with them, and its "
            "add() is not atomic"
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
