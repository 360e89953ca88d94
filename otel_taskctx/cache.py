"""A cache backend that keeps powercrud's locks on a model of our own, never culled, and which
caches would lose them (see docs/conflicts.md, *Storage* and *Eviction*)."""

from __future__ import annotations

import base64
import pickle
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
LOCK_SAFE_BACKEND = f"{__name__}.DatabaseCache"
#: seconds between two deletions of expired lock rows (per process and database)
PURGE_INTERVAL = 300.0
_purged: dict[str, float] = {}


def lock_db() -> str:
    from django.db import router

    from otel_taskctx.models import DescendantLock

    return router.db_for_write(DescendantLock)


def locks(db: str | None = None) -> Any:
    from otel_taskctx.models import DescendantLock

    return DescendantLock.objects.using(db or lock_db())


def encode(value: Any) -> str:
    """``base64(pickle(value))``, as Django's DatabaseCache encodes it."""
    return base64.b64encode(pickle.dumps(value, pickle.HIGHEST_PROTOCOL)).decode("latin1")


def decode(text: str) -> Any:
    return pickle.loads(base64.b64decode(text.encode()))


def purge_expired(db: str | None = None) -> None:
    """Now and then (every :data:`PURGE_INTERVAL` s per process), delete expired lock rows."""
    db = db or lock_db()
    moment = time.monotonic()
    if moment - _purged.get(db, -PURGE_INTERVAL) >= PURGE_INTERVAL:
        _purged[db] = moment  # (two threads purging at once do no harm)
        locks(db).filter(expires__lt=now()).delete()


class LockCache(BaseCache):
    """A Django cache whose lock keys (``OPTIONS["LOCK_KEY_PREFIXES"]``) are
    :class:`~otel_taskctx.models.DescendantLock` rows; ``fallback`` (a cache object) gets every
    other key, and makes the keys and timeouts (its ``make_key``, ``get_backend_timeout``)."""

    def __init__(self, location: str = "", params: Any = None, *, fallback: Any) -> None:
        params = params or {}
        BaseCache.__init__(self, params)
        prefixes = (params.get("OPTIONS") or {}).get("LOCK_KEY_PREFIXES")
        prefixes = prefixes or DEFAULT_LOCK_KEY_PREFIXES
        self.lock_key_prefixes = (prefixes,) if isinstance(prefixes, str) else tuple(prefixes)
        self.fallback = fallback

    def make_key(self, key: Any, version: Any = None) -> str:
        return self.fallback.make_key(key, version)

    def get_backend_timeout(self, timeout: Any = DEFAULT_TIMEOUT) -> float | None:
        return self.fallback.get_backend_timeout(timeout)

    def is_lock_key(self, key: Any) -> bool:
        return isinstance(key, str) and key.startswith(self.lock_key_prefixes)

    def expiry(self, timeout: Any = DEFAULT_TIMEOUT) -> datetime:
        """A row's ``expires`` for ``timeout``, in whole seconds, as Django's DatabaseCache."""
        from django.conf import settings

        timestamp, tz = self.get_backend_timeout(timeout), UTC if settings.USE_TZ else None
        if timestamp is None:
            return datetime.max.replace(microsecond=0, tzinfo=tz)
        return datetime.fromtimestamp(int(timestamp), tz=tz)

    def _rows(self, keys: Any, version: Any) -> Any:
        """The lock rows of those of ``keys`` that are lock keys."""
        mine = [self.make_and_validate_key(k, version) for k in keys if self.is_lock_key(k)]
        return locks().filter(cache_key__in=mine)

    def get(self, key, default=None, version=None):  # type: ignore[no-untyped-def]
        if not self.is_lock_key(key):
            return self.fallback.get(key, default, version)
        return self.get_many([key], version).get(key, default)

    def get_many(self, keys, version=None):  # type: ignore[no-untyped-def]
        keys = list(keys)
        mine = {self.make_and_validate_key(k, version): k for k in keys if self.is_lock_key(k)}
        others = [k for k in keys if not self.is_lock_key(k)]
        found = self.fallback.get_many(others, version) if others else {}
        rows, moment, expired = locks().filter(cache_key__in=list(mine)), now(), []
        for db_key, value, expires in rows.values_list("cache_key", "value", "expires"):
            if expires >= moment:
                found[mine[db_key]] = decode(value)
            else:
                expired.append(db_key)
        if expired:  # as Django's DatabaseCache does: an expired row read is deleted
            locks().filter(cache_key__in=expired, expires__lt=moment).delete()
        return found

    def set(self, key, value, timeout=DEFAULT_TIMEOUT, version=None):  # type: ignore[no-untyped-def]
        if not self.is_lock_key(key):
            return self.fallback.set(key, value, timeout, version)
        from otel_taskctx.models import DescendantLock

        db_key = self.make_and_validate_key(key, version)
        row = DescendantLock(cache_key=db_key, value=encode(value), expires=self.expiry(timeout))
        fields = {"unique_fields": ["cache_key"], "update_fields": ["value", "expires"]}
        locks().bulk_create([row], update_conflicts=True, **fields)
        purge_expired()

    def add(self, key, value, timeout=DEFAULT_TIMEOUT, version=None):  # type: ignore[no-untyped-def]
        """Set ``key`` if it is absent or expired; atomic across processes (the insert fails
        on the primary key when another one got there first)."""
        if not self.is_lock_key(key):
            return self.fallback.add(key, value, timeout, version)
        from django.db import IntegrityError, transaction

        db, db_key = lock_db(), self.make_and_validate_key(key, version)
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
        rows = self._rows([key], version).filter(expires__gte=now())
        return bool(rows.update(expires=self.expiry(timeout)))

    def delete(self, key, version=None):  # type: ignore[no-untyped-def]
        if not self.is_lock_key(key):
            return self.fallback.delete(key, version)
        return bool(self._rows([key], version).delete()[0])

    def delete_many(self, keys, version=None):  # type: ignore[no-untyped-def]
        keys = list(keys)
        if others := [k for k in keys if not self.is_lock_key(k)]:
            self.fallback.delete_many(others, version)
        self._rows(keys, version).delete()

    def clear(self) -> None:
        self.fallback.clear()
        locks().all().delete()


class DatabaseCache(LockCache, BaseDatabaseCache):
    """For ``CACHES``: Django's ``DatabaseCache`` on ``LOCATION`` for ordinary keys (culled as
    before; ``createcachetable`` creates its table), lock keys in the lock model."""

    def __init__(self, table: str, params: dict[str, Any]) -> None:
        BaseDatabaseCache.__init__(self, table, params)
        LockCache.__init__(self, table, params, fallback=DjangoDatabaseCache(table, params))


def lock_safe(cache: Any, alias: str | None = None) -> Any:
    """``cache``, or for Django's own ``DatabaseCache`` (which culls live locks) a
    ``LockCache(fallback=cache)``, one per cache object (so per thread). ``alias`` is unused."""
    if type(cache) is not DjangoDatabaseCache:
        return cache
    if "_otel_taskctx_lock_safe" not in vars(cache):
        vars(cache)["_otel_taskctx_lock_safe"] = LockCache(fallback=cache)
    return vars(cache)["_otel_taskctx_lock_safe"]


def backend_kind(backend: type) -> str:
    """What the cache backend class is, by its bases (never by its name): ``"lock-safe"``
    (ours), ``"database"`` (Django's own), ``"culling-database"`` (a subclass of it),
    ``"filebased"``, ``"locmem"``, ``"dummy"``, ``"memcached"``, ``"redis"`` or ``"other"``."""
    from django.core.cache.backends.memcached import BaseMemcachedCache
    from django.core.cache.backends.redis import RedisCache

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
        (RedisCache, "redis"),
    ):
        if issubclass(backend, base):
            return kind
    if any(c.__module__.startswith("django_redis.") for c in backend.__mro__):
        from django_redis.cache import RedisCache as DjangoRedisCache

        return "redis" if issubclass(backend, DjangoRedisCache) else "other"
    return "other"


_CULLS = "whenever it holds more than its MAX_ENTRIES (OPTIONS; 300 by default)"
_LOSSES = {
    "database": f"it deletes a third of its entries, oldest keys first, {_CULLS}, live locks "
    "with them",
    "filebased": f"it deletes a random share of its files {_CULLS}, live locks with them, and "
    "its add() is not atomic",
    "locmem": "it lives in one process: locks taken in a worker are invisible to the web "
    "process and to the other workers",
    "dummy": "it stores nothing",
}


def lock_loss(cache: Any) -> str | None:
    """Why ``cache`` would lose conflict locks for certain, or None where it keeps them (caches
    that evict only under memory pressure, Redis and Memcached, are left to the checks)."""
    kind = backend_kind(type(cache))
    return _LOSSES.get("database" if kind == "culling-database" else kind)


def refusal(alias: str, cache: Any) -> str | None:
    """Why a lock in ``cache`` is refused (the alias, the reason, the settings fix), or None."""
    reason = lock_loss(cache)
    if reason is None:
        return None
    path = f"{type(cache).__module__}.{type(cache).__qualname__}"
    return (
        f"cache {alias!r} ({path}) cannot hold conflict locks: {reason}. Nothing was locked. "
        f"Fix: CACHES[{alias!r}]['BACKEND'] = '{LOCK_SAFE_BACKEND}' (then run "
        "'manage.py createcachetable' and 'manage.py migrate'), or a django-redis cache."
    )
