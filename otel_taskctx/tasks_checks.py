"""System checks of the ``django.tasks`` task context (registered by the app's ``ready()``)."""

from __future__ import annotations

from django.core.checks import Tags, Warning, register


@register(Tags.compatibility)
def check_task_carrier_database(app_configs=None, **kwargs):
    """The carriers of queued tasks must live on the database of django-tasks-db's results:
    they are written in the transaction that writes the task's row."""
    from django.apps import apps
    from django.db import router

    from otel_taskctx.conf import get_setting

    try:
        if not apps.is_installed("django_tasks_db") or not get_setting("DJANGO_TASKS"):
            return []
    except Exception:  # OTEL_TASKCTX is not a dict: otel_taskctx.E001
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
