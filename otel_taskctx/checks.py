"""Django system checks for configurations that would break locks or identities."""

from __future__ import annotations

from django.conf import settings
from django.core.checks import Error, Tags, Warning, register
from django.core.exceptions import ImproperlyConfigured

from otel_taskctx.conf import DEFAULTS, user_settings


@register(Tags.compatibility)
def check_settings(app_configs=None, **kwargs):
    problems = []
    raw = getattr(settings, "OTEL_TASKCTX", None)
    if raw is not None and not isinstance(raw, dict):
        problems.append(
            Error("OTEL_TASKCTX must be a dict.", id="otel_taskctx.E001", obj="OTEL_TASKCTX")
        )
        return problems
    unknown = sorted(set(user_settings()) - set(DEFAULTS))
    if unknown:
        problems.append(
            Warning(
                f"Unknown OTEL_TASKCTX keys: {', '.join(unknown)}.",
                hint=f"Known keys: {', '.join(sorted(DEFAULTS))}.",
                id="otel_taskctx.W001",
            )
        )
    try:
        secret = user_settings().get("SIGNING_KEY") or settings.SECRET_KEY
    except ImproperlyConfigured:  # Django refuses to hand out an empty SECRET_KEY
        secret = None
    if not secret:
        problems.append(
            Error(
                "otel_taskctx cannot sign task identities: no SECRET_KEY or "
                "OTEL_TASKCTX['SIGNING_KEY'].",
                id="otel_taskctx.E002",
            )
        )
    return problems


@register(Tags.caches)
def check_powercrud_cache(app_configs=None, **kwargs):
    try:
        from powercrud.conf import get_powercrud_setting
    except Exception:  # powercrud not installed: nothing to check
        return []
    alias = get_powercrud_setting("CACHE_NAME", "default")
    caches = getattr(settings, "CACHES", {})
    if alias not in caches:
        return [
            Error(
                f"powercrud's cache alias {alias!r} is not in CACHES; descendant locks need it.",
                id="otel_taskctx.E003",
            )
        ]
    backend = str(caches[alias].get("BACKEND", "")).lower()
    if "locmem" in backend or "dummy" in backend:
        return [
            Error(
                f"Cache {alias!r} ({caches[alias]['BACKEND']}) is process-local: locks taken in a "
                "worker would be invisible to the web process.",
                hint="Use django.core.cache.backends.db.DatabaseCache or django_redis.",
                id="otel_taskctx.E004",
            )
        ]
    return []


# --- lock eviction: storage that can drop live locks (culling, LRU, maxmemory-policy) -------
_CULLING_BACKENDS = (
    "django.core.cache.backends.db.DatabaseCache",
    "django.core.cache.backends.filebased.FileBasedCache",
)
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
    try:
        from powercrud.conf import get_powercrud_setting
    except Exception:  # powercrud not installed: nothing to check
        return []
    from django.utils.module_loading import import_string

    alias = get_powercrud_setting("CACHE_NAME", "default")
    config = getattr(settings, "CACHES", {}).get(alias)
    if not config:
        return []  # otel_taskctx.E003
    path = str(config.get("BACKEND", ""))
    try:
        backend = import_string(path)
    except Exception:
        return []
    from otel_taskctx.cache import DJANGO_DATABASE_CACHE, LOCK_SAFE_BACKEND
    from otel_taskctx.cache import DatabaseCache as LockSafeDatabaseCache

    if issubclass(backend, LockSafeDatabaseCache) or path == DJANGO_DATABASE_CACHE:
        return []  # Django's own DatabaseCache is used through the lock-safe one
    culling = tuple(import_string(p) for p in _CULLING_BACKENDS)
    if issubclass(backend, culling):
        max_entries = (config.get("OPTIONS") or {}).get("MAX_ENTRIES", 300)
        return [
            Error(
                f"Cache {alias!r} ({path}) culls entries once it holds MAX_ENTRIES "
                f"({max_entries}) and would delete live conflict locks with them: "
                "otel_taskctx refuses every lock on it (register_descendants and launches "
                "with conflict_ids raise ConflictStoreUnavailable).",
                hint=f"Set CACHES[{alias!r}]['BACKEND'] = '{LOCK_SAFE_BACKEND}' (keeps locks "
                "in a table that is never culled; run createcachetable and migrate) or use a "
                "Redis cache with maxmemory-policy noeviction.",
                id="otel_taskctx.E030",
                obj=alias,
            )
        ]
    if "memcache" in path.lower():
        return [
            Warning(
                f"Cache {alias!r} ({path}) is Memcached, which evicts least recently used items "
                "when it is full, live conflict locks included.",
                hint="Use a Redis cache with maxmemory-policy noeviction, or "
                "'otel_taskctx.cache.DatabaseCache'.",
                id="otel_taskctx.W031",
                obj=alias,
            )
        ]
    if "redis" not in path.lower():
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
    try:
        from powercrud.conf import get_powercrud_setting
    except Exception:  # powercrud not installed: nothing to check
        return []
    from django.core.cache import caches
    from django.core.cache.backends.db import DatabaseCache as DjangoDatabaseCache
    from django.db import DEFAULT_DB_ALIAS, router

    alias = get_powercrud_setting("CACHE_NAME", "default")
    if alias not in getattr(settings, "CACHES", {}):
        return []  # otel_taskctx.E003
    try:
        cache = caches[alias]
    except Exception:
        return []
    if not isinstance(cache, DjangoDatabaseCache):
        return []
    db = router.db_for_write(cache.cache_model_class)
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


@register(Tags.database)
def check_span_database(app_configs=None, **kwargs):
    """``OTEL_TASKCTX["SPAN_DATABASE"]`` names a database, and the span table is routed there."""
    from django.db import router

    from otel_taskctx.conf import get_setting

    try:
        alias = get_setting("SPAN_DATABASE")
    except Exception:  # OTEL_TASKCTX is not a dict: otel_taskctx.E001
        return []
    if not alias:
        return []
    if alias not in getattr(settings, "DATABASES", {}):
        return [
            Error(
                f"OTEL_TASKCTX['SPAN_DATABASE'] is {alias!r}, which is not in DATABASES.",
                hint="Add that database alias, or remove the setting to keep the spans in "
                "the default database.",
                id="otel_taskctx.E005",
                obj="OTEL_TASKCTX",
            )
        ]
    from otel_taskctx.models import TaskSpan

    routed = router.db_for_write(TaskSpan)
    if routed != alias:
        return [
            Warning(
                f"OTEL_TASKCTX['SPAN_DATABASE'] is {alias!r} but the database routers send "
                f"the span table to {routed!r}: spans are written there.",
                hint="Add 'otel_taskctx.routers.SpanStoreRouter' to DATABASE_ROUTERS (before "
                "routers that claim every model), then run 'manage.py migrate --database "
                f"{alias}'.",
                id="otel_taskctx.W050",
                obj="OTEL_TASKCTX",
            )
        ]
    return []


def _task_backends() -> list[tuple[str, str, type]]:
    """``(alias, dotted path, class)`` of each ``TASKS`` backend, when ``django.tasks`` is
    instrumented (empty before Django 6.0, with ``DJANGO_TASKS`` off, or with an
    ``OTEL_TASKCTX`` that is not a dict: E001)."""
    try:
        from django.utils.module_loading import import_string

        from otel_taskctx.conf import get_setting

        if not get_setting("DJANGO_TASKS"):
            return []
    except Exception:
        return []
    found = []
    for alias, config in (getattr(settings, "TASKS", None) or {}).items():
        path = str((config or {}).get("BACKEND", ""))
        try:
            backend = import_string(path)
        except Exception:
            continue
        if isinstance(backend, type):
            found.append((alias, path, backend))
    return found


@register(Tags.compatibility)
def check_task_backends(app_configs=None, **kwargs):
    """``TASKS`` backends that cannot carry a task identity to a worker (``DummyBackend``)."""
    try:
        from django.tasks.backends.dummy import DummyBackend
    except ImportError:  # Django before 6.0
        return []
    problems = []
    for alias, path, backend in _task_backends():
        if issubclass(backend, DummyBackend):
            problems.append(
                Warning(
                    f"TASKS[{alias!r}] is {path} (DummyBackend): its tasks never run, so no "
                    "task identity reaches a worker and nothing is locked or reported.",
                    hint="Use django_tasks_db.DatabaseBackend (with manage.py db_worker), or "
                    "ImmediateBackend to run tasks in the calling process.",
                    id="otel_taskctx.W060",
                    obj=alias,
                )
            )
    return problems


@register(Tags.compatibility)
def check_fan_out(app_configs=None, **kwargs):
    """Fan-out configured where the job could not wait for its children (a sync broker)."""
    from otel_taskctx.conf import get_setting

    try:
        policy, listed = get_setting("NESTED_POLICY"), get_setting("FAN_OUT")
    except Exception:  # OTEL_TASKCTX is not a dict: otel_taskctx.E001
        return []
    if policy not in ("inline", "fan_out"):
        return [
            Error(
                f"OTEL_TASKCTX['NESTED_POLICY'] is {policy!r}.",
                hint="Use 'inline' (the default) or 'fan_out'.",
                id="otel_taskctx.E071",
                obj="OTEL_TASKCTX",
            )
        ]
    if policy != "fan_out" and not listed:
        return []
    problems = _fan_out_task_backends()
    if (getattr(settings, "Q_CLUSTER", None) or {}).get("sync"):
        return problems + [
            Error(
                "Nested launches fan out (OTEL_TASKCTX NESTED_POLICY/FAN_OUT) but "
                "Q_CLUSTER['sync'] runs every task in the caller: no other worker can run a "
                "child and the job could not wait for it; such launches raise "
                "FanOutUnavailable.",
                hint="Turn Q_CLUSTER['sync'] off, or set NESTED_POLICY to 'inline' and "
                "FAN_OUT to [].",
                id="otel_taskctx.E070",
                obj="OTEL_TASKCTX",
            )
        ]
    return problems


def _fan_out_task_backends() -> list:
    """``django.tasks`` backends that run a task in the caller or never: a nested enqueue
    that fans out there raises FanOutUnavailable."""
    try:
        from django.tasks.backends.dummy import DummyBackend
        from django.tasks.backends.immediate import ImmediateBackend
    except ImportError:  # Django before 6.0
        return []
    problems = []
    for alias, path, backend in _task_backends():
        if issubclass(backend, ImmediateBackend | DummyBackend):
            problems.append(
                Warning(
                    f"Nested launches fan out (OTEL_TASKCTX NESTED_POLICY/FAN_OUT) but "
                    f"TASKS[{alias!r}] is {path}, which runs tasks "
                    f"{'in the caller' if issubclass(backend, ImmediateBackend) else 'never'}: "
                    "a nested enqueue of one of its tasks that fans out raises "
                    "FanOutUnavailable.",
                    hint="Use django_tasks_db.DatabaseBackend with manage.py db_worker, or mark "
                    "that alias's tasks @run_inline.",
                    id="otel_taskctx.W072",
                    obj=alias,
                )
            )
    return problems
