"""django-tasks-db installed in the environment (as django-q2 and powercrud are) but none
of them in ``INSTALLED_APPS``: Django's ImmediateBackend, Django's DatabaseCache."""

from tests.configs.common import *  # noqa: F403

INSTALLED_APPS = [*BASE_APPS, "otel_taskctx"]  # noqa: F405
CACHES = DATABASE_CACHE  # noqa: F405
TASKS = {"default": {"BACKEND": "django.tasks.backends.immediate.ImmediateBackend"}}
