"""Django system checks of powercrud's cache (run only with ``"powercrud"`` in
``INSTALLED_APPS``): what each cache backend gets is in docs/conflicts.md, *Eviction*."""

from __future__ import annotations

from django.conf import settings
from django.core.checks import Error, Tags, Warning, register

from otel_taskctx.cache import LOCK_SAFE_BACKEND, backend_kind

LOST = (
    "A lock can be lost or taken twice, and two jobs can then edit the same objects. "
    "powercrud's own locking runs on it unchanged; otel_taskctx's register_descendants and "
    "nested launches with conflict_ids refuse it (ConflictStoreUnavailable)."
)


def _powercrud_cache() -> tuple[str, str, str] | None:
    """``(alias, dotted path, kind)`` of powercrud's cache, or None when ``"powercrud"`` is not
    in ``INSTALLED_APPS`` or its backend cannot be imported (Django's own checks say so)."""
    from django.apps import apps
    from django.utils.module_loading import import_string

    if not apps.is_installed("powercrud"):
        return None
    from powercrud.conf import get_powercrud_setting

    alias = get_powercrud_setting("CACHE_NAME", "default")
    config = getattr(settings, "CACHES", {}).get(alias)
    if config is None:
        return alias, "", ""  # otel_taskctx.E003
    path = str(config.get("BACKEND", ""))
    try:
        backend = import_string(path)
    except Exception:
        return None
    return (alias, path, backend_kind(backend)) if isinstance(backend, type) else None


def _warning(alias: str, number: int, msg: str, hint: str) -> list[Warning]:
    return [Warning(msg, hint=hint, id=f"otel_taskctx.W{number:03}", obj=alias)]


@register(Tags.caches)
def check_powercrud_cache(app_configs=None, **kwargs):
    """powercrud's cache alias exists (E003) and is shared between processes (W004)."""
    found = _powercrud_cache()
    if found is None:
        return []
    alias, path, kind = found
    if not path:
        return [
            Error(
                f"powercrud's cache alias {alias!r} is not in CACHES; descendant locks need it.",
                id="otel_taskctx.E003",
            )
        ]
    if kind not in ("locmem", "dummy"):
        return []
    what = "lives in one process" if kind == "locmem" else "stores nothing"
    return _warning(
        alias,
        4,
        f"Cache {alias!r} ({path}) {what}: conflict locks and progress are not shared across "
        "processes, so a job's locks are invisible to the web process and to the other "
        "workers, and two jobs can edit the same objects. powercrud's AsyncManager refuses "
        "this cache (ImproperlyConfigured); register_descendants and nested launches with "
        "conflict_ids refuse it too (ConflictStoreUnavailable). Nothing else changes: the "
        "project starts, checks and runs its tests as before.",
        f"Set CACHES[{alias!r}]['BACKEND'] = '{LOCK_SAFE_BACKEND}' (run createcachetable and "
        "migrate) or use a django-redis cache; a project that runs no powercrud async jobs "
        "can add 'otel_taskctx.W004' to SILENCED_SYSTEM_CHECKS.",
    )


def _redis_memory_policy(alias: str) -> tuple[str, int]:
    """``(maxmemory-policy, maxmemory)`` of the Redis server behind the cache ``alias``, asked
    with short timeouts on a connection of its own; raises when it cannot tell.

    django-redis: its public ``get_redis_connection``; Django's ``RedisCache`` has no public
    client: the first server of its ``LOCATION`` (with no ``OPTIONS``)."""
    import redis

    try:
        from django_redis import get_redis_connection

        pool = get_redis_connection(alias, write=True).connection_pool
        kwargs = dict(pool.connection_kwargs, decode_responses=True)
        kwargs.update(socket_timeout=2, socket_connect_timeout=2)
        pool = redis.ConnectionPool(connection_class=pool.connection_class, **kwargs)
    except (ImportError, NotImplementedError):  # Django's own RedisCache
        location = settings.CACHES[alias]["LOCATION"]
        first = location.split(",")[0] if isinstance(location, str) else location[0]
        pool = redis.ConnectionPool.from_url(
            first, decode_responses=True, socket_timeout=2, socket_connect_timeout=2
        )
    probe = redis.Redis(connection_pool=pool)
    try:
        values = probe.config_get("maxmemory*")
    finally:
        probe.close()
        pool.disconnect()
    return values["maxmemory-policy"], int(values.get("maxmemory") or 0)


@register(Tags.caches)
def check_lock_eviction(app_configs=None, **kwargs):
    """Caches that can drop live locks: culling (W030), Memcached (W031), an evicting (W032)
    or unreadable (W033) Redis ``maxmemory-policy``."""
    found = _powercrud_cache()
    if found is None:
        return []
    alias, path, kind = found
    if kind in ("culling-database", "filebased"):
        max_entries = (settings.CACHES[alias].get("OPTIONS") or {}).get("MAX_ENTRIES", 300)
        racy = ", and its add() is not atomic across processes" if kind == "filebased" else ""
        return _warning(
            alias,
            30,
            f"Cache {alias!r} ({path}) cannot keep conflict locks: it culls entries once it "
            f"holds MAX_ENTRIES ({max_entries}), live locks with them{racy}. {LOST}",
            f"Set CACHES[{alias!r}]['BACKEND'] = '{LOCK_SAFE_BACKEND}' (keeps locks in a "
            "table that is never culled; run createcachetable and migrate) or use a Redis "
            "cache with maxmemory-policy noeviction.",
        )
    if kind == "memcached":
        return _warning(
            alias,
            31,
            f"Cache {alias!r} ({path}) is Memcached, which evicts least recently used items "
            "when it is full, live conflict locks included.",
            f"Use a Redis cache with maxmemory-policy noeviction, or '{LOCK_SAFE_BACKEND}'.",
        )
    if kind != "redis":
        return []
    try:
        policy, maxmemory = _redis_memory_policy(alias)
    except Exception as exc:
        return _warning(
            alias,
            33,
            f"Could not read the maxmemory-policy of the Redis server behind cache {alias!r} "
            f"({type(exc).__name__}: {exc}); if it evicts keys, live conflict locks can "
            "disappear.",
            "Make sure the server runs with maxmemory-policy noeviction (or no maxmemory "
            "limit); silence this with SILENCED_SYSTEM_CHECKS once checked.",
        )
    if policy == "noeviction" or not maxmemory:
        return []
    scope = "any key" if policy.startswith("allkeys") else "keys with a TTL (locks have one)"
    return _warning(
        alias,
        32,
        f"The Redis server behind cache {alias!r} has maxmemory {maxmemory} with "
        f"maxmemory-policy {policy!r}: when full it evicts {scope}, live conflict locks "
        "included.",
        "Set maxmemory-policy noeviction on the server holding locks (a separate Redis "
        "database or instance for powercrud's cache if others need eviction).",
    )


@register(Tags.caches, Tags.database)
def check_lock_visibility(app_configs=None, **kwargs):
    """A database cache that shares the models' connection, and so their transactions (W040)."""
    from django.core.cache import caches
    from django.db import DEFAULT_DB_ALIAS, router

    from otel_taskctx.cache import lock_db

    found = _powercrud_cache()
    if found is None:
        return []
    alias, _, kind = found
    if kind in ("lock-safe", "database"):
        db = lock_db()  # locks are rows of our lock model
    elif kind == "culling-database":
        db = router.db_for_write(caches[alias].cache_model_class)
    else:
        return []
    if db != DEFAULT_DB_ALIAS:
        return []
    return _warning(
        alias,
        40,
        f"Cache {alias!r} writes conflict locks and progress on the {db!r} database "
        "connection, the one the models use: written inside a job's transaction (powercrud's "
        "bulk update runs in one), they stay invisible to other processes until it commits, "
        "so powercrud's check_conflict and progress polling miss them and a competing job "
        "waits on the row lock.",
        "Add a second DATABASES alias for the same database and route the cache table (app "
        "label 'django_cache') and otel_taskctx's models to it with a database router (see "
        "sample/config/routers.py and docs/conflicts.md).",
    )
