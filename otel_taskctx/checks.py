"""Django system checks for configurations that would break locks or identities. Those of
powercrud's cache run only with ``"powercrud"`` in ``INSTALLED_APPS`` (see docs/conflicts.md,
*Eviction*)."""

from __future__ import annotations

from django.conf import settings
from django.core.checks import Error, Tags, Warning, register
from django.core.exceptions import ImproperlyConfigured

from otel_taskctx.cache import LOCK_SAFE_BACKEND, backend_kind
from otel_taskctx.conf import DEFAULTS, get_setting, user_settings

FAN_OUT = "Nested launches fan out (OTEL_TASKCTX NESTED_POLICY/FAN_OUT) but "


def _settings(*names: str) -> list | None:
    """The ``OTEL_TASKCTX`` values, or None when it is not a dict (otel_taskctx.E001)."""
    raw = getattr(settings, "OTEL_TASKCTX", None)
    return None if raw is not None and not isinstance(raw, dict) else list(map(get_setting, names))


def _issue(level: type, number: str, msg: str, hint: str | None = None, obj: object = None):
    return [level(msg, hint=hint, id=f"otel_taskctx.{number}", obj=obj or "OTEL_TASKCTX")]


@register(Tags.compatibility)
def check_settings(app_configs=None, **kwargs):
    if _settings() is None:
        return _issue(Error, "E001", "OTEL_TASKCTX must be a dict.")
    problems = []
    unknown = sorted(set(user_settings()) - set(DEFAULTS))
    if unknown:
        keys, known = ", ".join(unknown), ", ".join(sorted(DEFAULTS))
        problems += _issue(Warning, "W001", f"Unknown OTEL_TASKCTX keys: {keys}.", known)
    try:
        secret = user_settings().get("SIGNING_KEY") or settings.SECRET_KEY
    except ImproperlyConfigured:  # Django refuses to hand out an empty SECRET_KEY
        secret = None
    if not secret:
        problems += _issue(
            Error,
            "E002",
            "otel_taskctx cannot sign task identities: no SECRET_KEY or "
            "OTEL_TASKCTX['SIGNING_KEY'].",
        )
    return problems


@register(Tags.database)
def check_span_database(app_configs=None, **kwargs):
    """``SPAN_DATABASE`` names a database (E005), and the span table is routed there (W050)."""
    from django.db import router

    (alias,) = _settings("SPAN_DATABASE") or [None]
    if not alias:
        return []
    if alias not in getattr(settings, "DATABASES", {}):
        return _issue(
            Error,
            "E005",
            f"OTEL_TASKCTX['SPAN_DATABASE'] is {alias!r}, which is not in DATABASES.",
            "Add that alias, or remove the setting to keep the spans in the default database.",
        )
    from otel_taskctx.models import TaskSpan

    routed = router.db_for_write(TaskSpan)
    if routed == alias:
        return []
    return _issue(
        Warning,
        "W050",
        f"OTEL_TASKCTX['SPAN_DATABASE'] is {alias!r} but the database routers send the span "
        f"table to {routed!r}: spans are written there.",
        "Add 'otel_taskctx.routers.SpanStoreRouter' to DATABASE_ROUTERS (before routers that "
        f"claim every model), then run 'manage.py migrate --database {alias}'.",
    )


def _task_backends(*bases: type) -> list[tuple[str, str, type]]:
    """``(alias, dotted path, class)`` of the ``TASKS`` backends that subclass one of ``bases``,
    where ``django.tasks`` is instrumented (``DJANGO_TASKS``)."""
    from django.utils.module_loading import import_string

    if not (_settings("DJANGO_TASKS") or [False])[0]:
        return []
    found = []
    for alias, config in (getattr(settings, "TASKS", None) or {}).items():
        path = str((config or {}).get("BACKEND", ""))
        try:
            backend = import_string(path)
        except Exception:
            continue
        if isinstance(backend, type) and issubclass(backend, bases):
            found.append((alias, path, backend))
    return found


@register(Tags.compatibility)
def check_task_backends(app_configs=None, **kwargs):
    """``TASKS`` backends that never run a task, so carry no identity to a worker (W060)."""
    try:
        from django.tasks.backends.dummy import DummyBackend
    except ImportError:  # Django before 6.0
        return []
    problems = []
    for alias, path, _ in _task_backends(DummyBackend):
        problems += _issue(
            Warning,
            "W060",
            f"TASKS[{alias!r}] is {path} (DummyBackend): its tasks never run, so no task "
            "identity reaches a worker and nothing is locked or reported.",
            "Use django_tasks_db.DatabaseBackend (with manage.py db_worker), or "
            "ImmediateBackend to run tasks in the calling process.",
            alias,
        )
    return problems


@register(Tags.compatibility)
def check_task_carrier_database(app_configs=None, **kwargs):
    """The carriers of queued tasks are migrated where django-tasks-db writes its results
    (they are written in the same transaction) (W061)."""
    from django.apps import apps
    from django.db import router

    if not apps.is_installed("django_tasks_db") or not (_settings("DJANGO_TASKS") or [0])[0]:
        return []
    from otel_taskctx.models import TaskCarrier

    config = next(c for c in apps.get_app_configs() if c.name == "django_tasks_db")
    database = router.db_for_write(config.get_model("DBTaskResult"))
    if router.allow_migrate_model(database, TaskCarrier):
        return []
    return _issue(
        Warning,
        "W061",
        f"otel_taskctx's TaskCarrier table is not migrated on database {database!r}, where "
        "django-tasks-db writes its task results (a carrier is written in the same "
        "transaction): django.tasks tasks run without a task identity (no locks, no nesting).",
        "Route the model otel_taskctx.TaskCarrier like django_tasks_db's models in "
        "DATABASE_ROUTERS (allow_migrate and db_for_read/db_for_write).",
        "otel_taskctx.TaskCarrier",
    )


@register(Tags.compatibility)
def check_fan_out(app_configs=None, **kwargs):
    """A known ``NESTED_POLICY`` (E071); fan-out only where a job can wait for its children:
    not on a sync django-q2 cluster (E070), a backend that runs tasks in the caller or never
    (W072), nor with Celery's ``task_always_eager`` (W073)."""
    policy, listed = _settings("NESTED_POLICY", "FAN_OUT") or ("inline", [])
    if policy not in ("inline", "fan_out"):
        hint = "Use 'inline' (the default) or 'fan_out'."
        return _issue(Error, "E071", f"OTEL_TASKCTX['NESTED_POLICY'] is {policy!r}.", hint)
    if policy != "fan_out" and not listed:
        return []
    problems = []
    try:
        from django.tasks.backends.dummy import DummyBackend
        from django.tasks.backends.immediate import ImmediateBackend
    except ImportError:  # Django before 6.0
        backends = []
    else:
        backends = _task_backends(ImmediateBackend, DummyBackend)
    for alias, path, backend in backends:
        runs = "in the caller" if issubclass(backend, ImmediateBackend) else "never"
        problems += _issue(
            Warning,
            "W072",
            f"{FAN_OUT}TASKS[{alias!r}] is {path}, which runs tasks {runs}: a nested enqueue "
            "of one of its tasks that fans out raises FanOutUnavailable.",
            "Use django_tasks_db.DatabaseBackend with manage.py db_worker, or mark that "
            "alias's tasks @run_inline.",
            alias,
        )
    if _celery_eager():
        problems += _issue(
            Warning,
            "W073",
            f"{FAN_OUT}Celery's task_always_eager runs every task in the caller: a nested "
            "launch of a Celery task that fans out raises FanOutUnavailable.",
            "Turn task_always_eager off (CELERY_TASK_ALWAYS_EAGER), or mark those tasks "
            "@run_inline.",
        )
    if (getattr(settings, "Q_CLUSTER", None) or {}).get("sync"):
        problems += _issue(
            Error,
            "E070",
            f"{FAN_OUT}Q_CLUSTER['sync'] runs every task in the caller: no other worker can "
            "run a child and the job could not wait for it; such launches raise "
            "FanOutUnavailable.",
            "Turn Q_CLUSTER['sync'] off, or set NESTED_POLICY to 'inline' and FAN_OUT to [].",
        )
    return problems


def _celery_eager() -> bool:
    """Celery runs tasks in the caller: ``CELERY_TASK_ALWAYS_EAGER`` (the Django settings
    namespace), or the current app's ``task_always_eager`` where Celery is imported."""
    import sys

    if getattr(settings, "CELERY_TASK_ALWAYS_EAGER", False):
        return True
    if "celery" not in sys.modules:  # never imported here
        return False
    try:
        from celery import current_app

        return bool(current_app.conf.task_always_eager)
    except Exception:
        return False


# --- powercrud's cache ----------------------------------------------------------------------
FIX = f"Set the cache's BACKEND to '{LOCK_SAFE_BACKEND}' (run createcachetable and migrate)"


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


@register(Tags.caches)
def check_powercrud_cache(app_configs=None, **kwargs):
    """powercrud's cache alias exists (E003) and is shared between processes (W004)."""
    found = _powercrud_cache()
    if found is None:
        return []
    alias, path, kind = found
    if not path:
        msg = f"powercrud's cache alias {alias!r} is not in CACHES; descendant locks need it."
        return _issue(Error, "E003", msg, obj=alias)
    if kind not in ("locmem", "dummy"):
        return []
    what = "lives in one process" if kind == "locmem" else "stores nothing"
    return _issue(
        Warning,
        "W004",
        f"Cache {alias!r} ({path}) {what}: conflict locks and progress are not shared across "
        "processes, so two jobs can edit the same objects. powercrud's AsyncManager refuses "
        "it, and so does otel_taskctx's locking (ConflictStoreUnavailable); nothing else "
        "changes.",
        f"{FIX} or use a django-redis cache; silence 'otel_taskctx.W004' where no powercrud "
        "async job runs.",
        alias,
    )


def _redis_memory_policy(alias: str) -> tuple[str, int]:
    """``(maxmemory-policy, maxmemory)`` of the Redis server behind the cache ``alias`` (through
    django-redis' ``get_redis_connection``, or the first ``LOCATION`` of Django's
    ``RedisCache``), on a connection of its own with short timeouts."""
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
    hint = f"{FIX} or use a Redis cache with maxmemory-policy noeviction."
    if kind in ("culling-database", "filebased"):
        entries = (settings.CACHES[alias].get("OPTIONS") or {}).get("MAX_ENTRIES", 300)
        racy = ", and its add() is not atomic" if kind == "filebased" else ""
        return _issue(
            Warning,
            "W030",
            f"Cache {alias!r} ({path}) cannot keep conflict locks: it culls entries once it "
            f"holds MAX_ENTRIES ({entries}), live locks with them{racy}, so two jobs can edit "
            "the same objects. otel_taskctx's locking refuses it; powercrud's runs unchanged.",
            hint,
            alias,
        )
    if kind == "memcached":
        return _issue(
            Warning,
            "W031",
            f"Cache {alias!r} ({path}) is Memcached, which evicts least recently used items "
            "when it is full, live conflict locks included.",
            hint,
            alias,
        )
    if kind != "redis":
        return []
    try:
        policy, maxmemory = _redis_memory_policy(alias)
    except Exception as exc:
        return _issue(
            Warning,
            "W033",
            f"Could not read the maxmemory-policy of the Redis server behind cache {alias!r} "
            f"({type(exc).__name__}: {exc}); if it evicts keys, live locks can disappear.",
            "Run it with maxmemory-policy noeviction; then silence this check.",
            alias,
        )
    if policy == "noeviction" or not maxmemory:
        return []
    scope = "any key" if policy.startswith("allkeys") else "keys with a TTL (locks have one)"
    return _issue(
        Warning,
        "W032",
        f"The Redis server behind cache {alias!r} has maxmemory {maxmemory} with "
        f"maxmemory-policy {policy!r}: when full it evicts {scope}, live locks included.",
        "Set maxmemory-policy noeviction on the server (or Redis database) holding locks.",
        alias,
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
    return _issue(
        Warning,
        "W040",
        f"Cache {alias!r} writes conflict locks and progress on the {db!r} connection, the "
        "models' own: written inside a job's transaction, they stay invisible to other "
        "processes until it commits.",
        "Route the cache table (app label 'django_cache') and otel_taskctx's models to a "
        "second DATABASES alias of the same database (see docs/conflicts.md).",
        alias,
    )
