"""Django's defaults: no ``CACHES`` (LocMemCache), no ``TASKS`` (ImmediateBackend), no queue
app and no powercrud in ``INSTALLED_APPS``."""

from tests.configs.common import *  # noqa: F403

INSTALLED_APPS = [*BASE_APPS, "otel_taskctx"]  # noqa: F405
