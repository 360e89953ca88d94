from __future__ import annotations

import logging

from django.apps import AppConfig

log = logging.getLogger("otel_taskctx")


class OtelTaskCtxConfig(AppConfig):
    name = "otel_taskctx"
    label = "otel_taskctx"
    verbose_name = "OpenTelemetry task context"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from otel_taskctx import checks  # noqa: F401  (registers the system checks)
        from otel_taskctx.conf import get_setting, signing_settings
        from otel_taskctx.identity import configure_signing
        from otel_taskctx.propagation import install_propagator_filter

        secret, fallbacks, ttl = signing_settings()
        if secret:
            configure_signing(secret, fallbacks, ttl)
        if get_setting("FILTER_GLOBAL_PROPAGATOR"):
            install_propagator_filter()
