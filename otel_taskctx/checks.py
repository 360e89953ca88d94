"""Django system checks for configurations that would break locks or identities (those of
powercrud's cache are in :mod:`otel_taskctx.cache_checks`). See docs/index.md."""

from __future__ import annotations

from django.conf import settings
from django.core.checks import Error, Tags, Warning, register
from django.core.exceptions import ImproperlyConfigured

from otel_taskctx import cache_checks  # noqa: F401  (registers the cache checks)
from otel_taskctx.conf import DEFAULTS, get_setting, user_settings


def _settings(*names: str) -> list | None:
    """The ``OTEL_TASKCTX`` values, or None when it is not a dict (otel_taskctx.E001)."""
    raw = getattr(settings, "OTEL_TASKCTX", None)
    return None if raw is not None and not isinstance(raw, dict) else list(map(get_setting, names))


@register(Tags.compatibility)
def check_settings(app_configs=None, **kwargs):
    if _settings() is None:
        return [Error("OTEL_TASKCTX must be a dict.", id="otel_taskctx.E001", obj="OTEL_TASKCTX")]
    problems = []
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


@register(Tags.database)
def check_span_database(app_configs=None, **kwargs):
    """``OTEL_TASKCTX["SPAN_DATABASE"]`` names a database, and the span table is routed there."""
    from django.db import router

    (alias,) = _settings("SPAN_DATABASE") or [None]
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
    if routed == alias:
        return []
    return [
        Warning(
            f"OTEL_TASKCTX['SPAN_DATABASE'] is {alias!r} but the database routers send the "
            f"span table to {routed!r}: spans are written there.",
            hint="Add 'otel_taskctx.routers.SpanStoreRouter' to DATABASE_ROUTERS (before "
            f"routers that claim every model), then run 'manage.py migrate --database {alias}'.",
            id="otel_taskctx.W050",
            obj="OTEL_TASKCTX",
        )
    ]


def _task_backends(*bases: type) -> list[tuple[str, str, type]]:
    """``(alias, dotted path, class)`` of the ``TASKS`` backends that subclass one of ``bases``,
    when ``django.tasks`` is instrumented (``DJANGO_TASKS``)."""
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
    """``TASKS`` backends that cannot carry a task identity to a worker (``DummyBackend``)."""
    try:
        from django.tasks.backends.dummy import DummyBackend
    except ImportError:  # Django before 6.0
        return []
    return [
        Warning(
            f"TASKS[{alias!r}] is {path} (DummyBackend): its tasks never run, so no task "
            "identity reaches a worker and nothing is locked or reported.",
            hint="Use django_tasks_db.DatabaseBackend (with manage.py db_worker), or "
            "ImmediateBackend to run tasks in the calling process.",
            id="otel_taskctx.W060",
            obj=alias,
        )
        for alias, path, _ in _task_backends(DummyBackend)
    ]


@register(Tags.compatibility)
def check_task_carrier_database(app_configs=None, **kwargs):
    """The carriers of queued tasks live on the database of django-tasks-db's results: they
    are written in the transaction that writes the task's row."""
    from django.apps import apps
    from django.db import router

    if not apps.is_installed("django_tasks_db") or not (_settings("DJANGO_TASKS") or [0])[0]:
        return []
    from otel_taskctx.models import TaskCarrier

    config = next(c for c in apps.get_app_configs() if c.name == "django_tasks_db")
    database = router.db_for_write(config.get_model("DBTaskResult"))
    if router.allow_migrate_model(database, TaskCarrier):
        return []
    return [
        Warning(
            f"otel_taskctx's TaskCarrier table is not migrated on database {database!r}, where "
            "django-tasks-db writes its task results: a task's carrier is written in the same "
            "transaction as its row, so django.tasks tasks run without a task identity (no "
            "locks, no nesting).",
            hint="Route the model otel_taskctx.TaskCarrier like django_tasks_db's models in "
            "DATABASE_ROUTERS (allow_migrate and db_for_read/db_for_write).",
            id="otel_taskctx.W061",
            obj="otel_taskctx.TaskCarrier",
        )
    ]


@register(Tags.compatibility)
def check_fan_out(app_configs=None, **kwargs):
    """Fan-out configured where the job could not wait for its children."""
    policy, listed = _settings("NESTED_POLICY", "FAN_OUT") or ("inline", [])
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
    problems = []
    try:
        from django.tasks.backends.dummy import DummyBackend
        from django.tasks.backends.immediate import ImmediateBackend
    except ImportError:  # Django before 6.0
        pass
    else:
        for alias, path, backend in _task_backends(ImmediateBackend, DummyBackend):
            runs = "in the caller" if issubclass(backend, ImmediateBackend) else "never"
            problems.append(
                Warning(
                    "Nested launches fan out (OTEL_TASKCTX NESTED_POLICY/FAN_OUT) but "
                    f"TASKS[{alias!r}] is {path}, which runs tasks {runs}: a nested enqueue of "
                    "one of its tasks that fans out raises FanOutUnavailable.",
                    hint="Use django_tasks_db.DatabaseBackend with manage.py db_worker, or mark "
                    "that alias's tasks @run_inline.",
                    id="otel_taskctx.W072",
                    obj=alias,
                )
            )
    if (getattr(settings, "Q_CLUSTER", None) or {}).get("sync"):
        problems.append(
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
        )
    return problems
