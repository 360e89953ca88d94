"""Django system checks for configurations that would break locks or identities (the checks
of powercrud's cache are in :mod:`otel_taskctx.cache_checks`)."""

from __future__ import annotations

from django.conf import settings
from django.core.checks import Error, Tags, Warning, register
from django.core.exceptions import ImproperlyConfigured

from otel_taskctx import cache_checks  # noqa: F401  (registers the cache checks)
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
