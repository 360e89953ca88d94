"""The embedded span store (needs ``opentelemetry-sdk``): spans in the Django database, and
job trees built from them (:mod:`~otel_taskctx.spans.queries`)."""

from otel_taskctx.spans.store import (
    DatabaseSpanExporter,
    RunningSpanProcessor,
    StoreSpanProcessor,
    flush_span_store,
    install_env_exporters,
    install_span_store,
)

__all__ = [
    "DatabaseSpanExporter",
    "RunningSpanProcessor",
    "StoreSpanProcessor",
    "flush_span_store",
    "install_env_exporters",
    "install_span_store",
]
