"""Django system checks of powercrud's cache: what each cache backend gets.

They run only with ``"powercrud"`` in ``INSTALLED_APPS`` (a project that has powercrud
installed but does not use it is not checked). Every finding about a cache that works is a
Warning; see docs/conflicts.md (per-backend table) for what each cache gets.
"""

from __future__ import annotations

from django.conf import settings
from django.core.checks import Error, Tags, Warning, register


def _powercrud_alias() -> str | None:
    """powercrud's cache alias, or None when ``"powercrud"`` is not in ``INSTALLED_APPS``
    (importable is not enough: a project that does not use powercrud is not checked)."""
    from django.apps import apps

    if not apps.is_installed("powercrud"):
        return None
    try:
        from powercrud.conf import get_powercrud_setting
    except Exception:  # pragma: no cover - installed but not importable: Django says so
        return None
    return get_powercrud_setting("CACHE_NAME", "default")


def _backend(alias: str) -> tuple[str, type] | None:
    """``(dotted path, class)`` of the cache ``alias``, or None when it cannot be imported."""
    from django.utils.module_loading import import_string

    config = getattr(settings, "CACHES", {}).get(alias)
    if not config:
        return None
    path = str(config.get("BACKEND", ""))
    try:
        backend = import_string(path)
    except Exception:  # Django's own cache checks report it
        return None
    return (path, backend) if isinstance(backend, type) else None


def _lock_safe_backend() -> str:
    from otel_taskctx.cache import LOCK_SAFE_BACKEND

    return LOCK_SAFE_BACKEND


def _single_process(alias: str, path: str, kind: str) -> Warning:
    what = "lives in one process" if kind == "locmem" else "stores nothing"
    return Warning(
        f"Cache {alias!r} ({path}) {what}: conflict locks and progress are not shared "
        "across processes, so a job's locks are invisible to the web process and to the "
        "other workers, and two jobs can edit the same objects. powercrud's AsyncManager "
        "refuses this cache (ImproperlyConfigured); register_descendants and nested launches "
        "with conflict_ids refuse it too (ConflictStoreUnavailable). Nothing else changes: "
        "the project starts, checks and runs its tests as before.",
        hint=f"Set CACHES[{alias!r}]['BACKEND'] = '{_lock_safe_backend()}' (run "
        "createcachetable and migrate) or use a django-redis cache; a project that runs no "
        "powercrud async jobs can add 'otel_taskctx.W004' to SILENCED_SYSTEM_CHECKS.",
        id="otel_taskctx.W004",
        obj=alias,
    )


@register(Tags.caches)
def check_powercrud_cache(app_configs=None, **kwargs):
    """powercrud's cache alias exists and is shared between processes."""
    alias = _powercrud_alias()
    if alias is None:
        return []
    if alias not in getattr(settings, "CACHES", {}):
        return [
            Error(
                f"powercrud's cache alias {alias!r} is not in CACHES; descendant locks need it.",
                id="otel_taskctx.E003",
            )
        ]
    found = _backend(alias)
    if found is None:
        return []
    from otel_taskctx.cache import backend_kind

    path, backend = found
    kind = backend_kind(backend)
    if kind in ("locmem", "dummy"):
        return [_single_process(alias, path, kind)]
    return []


# --- lock eviction: storage that can drop live locks (culling, LRU, maxmemory-policy) -------
_NON_EVICTING_REDIS_POLICIES = ("noeviction",)


def _redis_memory_policy(cache) -> tuple[str, int]:
    """``(maxmemory-policy, maxmemory)`` of the Redis server behind ``cache``.

    Asks with short timeouts on a connection of its own; raises when it cannot tell.
    """
    import redis

    client = getattr(cache, "client", None)  # django-redis
    if client is not None and hasattr(client, "get_client"):
        server = client.get_client(write=True)
    else:  # Django's own RedisCache
        server = cache._cache.get_client(None, write=True)
    pool = server.connection_pool
    kwargs = dict(pool.connection_kwargs, socket_timeout=2, socket_connect_timeout=2)
    probe = redis.Redis(
        connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs)
    )
    try:
        values = probe.config_get("maxmemory*")
    finally:
        probe.close()
        probe.connection_pool.disconnect()

    def text(v):
        return v.decode() if isinstance(v, bytes) else str(v)

    values = {text(k): text(v) for k, v in values.items()}
    if "maxmemory-policy" not in values:
        raise RuntimeError("CONFIG GET returned no maxmemory-policy")
    return values["maxmemory-policy"], int(values.get("maxmemory", "0") or 0)


@register(Tags.caches)
def check_lock_eviction(app_configs=None, **kwargs):
    """Flag cache configurations that can evict powercrud's (and our descendant) locks."""
    alias = _powercrud_alias()
    found = _backend(alias) if alias is not None else None
    if found is None:
        return []  # no powercrud, otel_taskctx.E003, or a backend Django reports
    from otel_taskctx.cache import backend_kind

    path, backend = found
    kind = backend_kind(backend)
    if kind in ("culling-database", "filebased"):
        max_entries = (settings.CACHES[alias].get("OPTIONS") or {}).get("MAX_ENTRIES", 300)
        racy = ", and its add() is not atomic across processes" if kind == "filebased" else ""
        return [
            Warning(
                f"Cache {alias!r} ({path}) cannot keep conflict locks: it culls entries once "
                f"it holds MAX_ENTRIES ({max_entries}), live locks with them{racy}. A lock "
                "can be lost or taken twice, and two jobs can then edit the same objects. "
                "powercrud's own locking runs on it unchanged; otel_taskctx's "
                "register_descendants and nested launches with conflict_ids refuse it "
                "(ConflictStoreUnavailable).",
                hint=f"Set CACHES[{alias!r}]['BACKEND'] = '{_lock_safe_backend()}' (keeps "
                "locks in a table that is never culled; run createcachetable and migrate) or "
                "use a Redis cache with maxmemory-policy noeviction.",
                id="otel_taskctx.W030",
                obj=alias,
            )
        ]
    if kind == "memcached":
        return [
            Warning(
                f"Cache {alias!r} ({path}) is Memcached, which evicts least recently used items "
                "when it is full, live conflict locks included.",
                hint="Use a Redis cache with maxmemory-policy noeviction, or "
                f"'{_lock_safe_backend()}'.",
                id="otel_taskctx.W031",
                obj=alias,
            )
        ]
    if kind != "redis":
        return []
    from django.core.cache import caches

    try:
        policy, maxmemory = _redis_memory_policy(caches[alias])
    except Exception as exc:
        return [
            Warning(
                f"Could not read the maxmemory-policy of the Redis server behind cache "
                f"{alias!r} ({type(exc).__name__}: {exc}); if it evicts keys, live conflict "
                "locks can disappear.",
                hint="Make sure the server runs with maxmemory-policy noeviction (or no "
                "maxmemory limit); silence this with SILENCED_SYSTEM_CHECKS once checked.",
                id="otel_taskctx.W033",
                obj=alias,
            )
        ]
    if policy not in _NON_EVICTING_REDIS_POLICIES and maxmemory:
        scope = "any key" if policy.startswith("allkeys") else "keys with a TTL (locks have one)"
        return [
            Warning(
                f"The Redis server behind cache {alias!r} has maxmemory {maxmemory} with "
                f"maxmemory-policy {policy!r}: when full it evicts {scope}, live conflict locks "
                "included.",
                hint="Set maxmemory-policy noeviction on the server holding locks (a separate "
                "Redis database or instance for powercrud's cache if others need eviction).",
                id="otel_taskctx.W032",
                obj=alias,
            )
        ]
    return []


@register(Tags.caches, Tags.database)
def check_lock_visibility(app_configs=None, **kwargs):
    """Flag a database cache that shares the models' connection (and so their transactions)."""
    alias = _powercrud_alias()
    if alias is None:
        return []
    from django.core.cache import caches
    from django.db import DEFAULT_DB_ALIAS, router

    from otel_taskctx.cache import backend_kind, lock_db

    if alias not in getattr(settings, "CACHES", {}):
        return []  # otel_taskctx.E003
    try:
        cache = caches[alias]
    except Exception:
        return []
    kind = backend_kind(type(cache))
    if kind in ("lock-safe", "database"):
        db = lock_db()  # locks are rows of our lock model
    elif kind == "culling-database":
        db = router.db_for_write(cache.cache_model_class)
    else:
        return []
    if db != DEFAULT_DB_ALIAS:
        return []
    return [
        Warning(
            f"Cache {alias!r} writes conflict locks and progress on the {db!r} database "
            "connection, the one the models use: written inside a job's transaction "
            "(powercrud's bulk update runs in one), they stay invisible to other processes "
            "until it commits, so powercrud's check_conflict and progress polling miss them "
            "and a competing job waits on the row lock.",
            hint="Add a second DATABASES alias for the same database and route the cache "
            "table (app label 'django_cache') and otel_taskctx's models to it with a "
            "database router (see sample/config/routers.py and docs/conflicts.md).",
            id="otel_taskctx.W040",
            obj=alias,
        )
    ]
