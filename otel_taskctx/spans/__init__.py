"""The embedded span store: finished (and running) spans in the Django database.

See :mod:`otel_taskctx.spans.provider` for how it is put on the tracer provider,
:mod:`otel_taskctx.spans.flushing` for having spans written now,
:mod:`otel_taskctx.spans.tree` for building a job's tree from stored spans and
:mod:`otel_taskctx.spans.queries` for reading trees back.
"""

from otel_taskctx.spans.exporter import (
    DatabaseSpanExporter,
    RunningSpanProcessor,
    StoreSpanProcessor,
)
from otel_taskctx.spans.flushing import flush_span_store
from otel_taskctx.spans.provider import install_env_exporters, install_span_store

__all__ = [
    "DatabaseSpanExporter",
    "RunningSpanProcessor",
    "StoreSpanProcessor",
    "flush_span_store",
    "install_env_exporters",
    "install_span_store",
]
