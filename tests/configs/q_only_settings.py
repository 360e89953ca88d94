"""django-q2 without powercrud (ORM broker, Django's DatabaseCache)."""

from tests.configs.common import *  # noqa: F403

INSTALLED_APPS = [*BASE_APPS, "django_q", "otel_taskctx"]  # noqa: F405
CACHES = DATABASE_CACHE  # noqa: F405
Q_CLUSTER = Q_CLUSTER_ORM  # noqa: F405
