"""``django.tasks`` alone: django-tasks-db's backend, neither django-q2 nor powercrud in
``INSTALLED_APPS`` (no ``Q_CLUSTER``)."""

from tests.configs.common import *  # noqa: F403

INSTALLED_APPS = [*BASE_APPS, "django_tasks_db", "otel_taskctx"]  # noqa: F405
CACHES = DATABASE_CACHE  # noqa: F405
TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend"}}
