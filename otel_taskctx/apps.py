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
        """Checks, lock-safe caches, the propagator filter, the instrumentation and the span
        processor and store, as the settings ask (the signing keys are read on first use)."""
        from django.core.signals import setting_changed

        from otel_taskctx import checks, powercrud_cache  # noqa: F401 (checks)
        from otel_taskctx.conf import get_setting
        from otel_taskctx.descendants import clear_manager_cache
        from otel_taskctx.propagation import install_propagator_filter

        powercrud_cache.install()  # locks kept where nothing culls them, whatever else is on
        setting_changed.connect(clear_manager_cache, dispatch_uid="otel_taskctx.managers")
        if get_setting("FILTER_GLOBAL_PROPAGATOR"):
            install_propagator_filter()
        if get_setting("AUTO_INSTRUMENT"):
            from opentelemetry.instrumentation.taskctx import TaskContextInstrumentor

            instrumentor = TaskContextInstrumentor()
            if instrumentor.is_instrumented_by_opentelemetry:
                instrumentor.apply_deferred()  # e.g. loaded by opentelemetry-instrument
            else:
                instrumentor.instrument()
        try:  # the span processor and the span store need the OpenTelemetry SDK
            import opentelemetry.sdk.trace  # noqa: F401
        except ImportError:
            log.info("otel_taskctx: no OpenTelemetry SDK; no span processor, no span store")
            return
        if get_setting("SPAN_PROCESSOR"):
            from otel_taskctx.processor import install_span_processor

            install_span_processor()
        if get_setting("SPAN_STORE"):
            from otel_taskctx.spans import install_span_store

            install_span_store()
        if get_setting("EXPORT_FROM_ENV"):
            from otel_taskctx.spans import install_env_exporters

            install_env_exporters()
