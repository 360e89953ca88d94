"""powercrud + django-q2 (ORM broker, Django's DatabaseCache); django-tasks-db is installed
in the environment but not in ``INSTALLED_APPS``."""

from tests.configs.common import *  # noqa: F403

INSTALLED_APPS = [*BASE_APPS, "django_q", "powercrud", "otel_taskctx"]  # noqa: F405
CACHES = DATABASE_CACHE  # noqa: F405
Q_CLUSTER = Q_CLUSTER_ORM  # noqa: F405
POWERCRUD_SETTINGS = {"ASYNC_ENABLED": True, "CACHE_NAME": "default"}
