"""otel-taskctx: task identity as OpenTelemetry baggage for nested async work in Django.

Importing this package needs only ``opentelemetry-api``; the helpers that talk to powercrud
import Django and powercrud when they are called. ``TaskContextSpanProcessor`` and
``install_span_processor`` need ``opentelemetry-sdk`` and are imported when first used.
"""

from otel_taskctx.conflicts import get_conflict_store, keep_locks_alive
from otel_taskctx.context import allow_nested_async, current_task, skip_nested_async, task_context
from otel_taskctx.descendants import Registration, register_descendants
from otel_taskctx.errors import (
    ConflictStoreUnavailable,
    DescendantConflict,
    FanOutChildFailed,
    FanOutUnavailable,
    TaskContextError,
)
from otel_taskctx.identity import TaskIdentity, configure_signing
from otel_taskctx.policy import fan_out, run_inline
from otel_taskctx.progress import flush_progress, report_progress
from otel_taskctx.propagation import extract, inject, install_propagator_filter
from otel_taskctx.tracer_provider import join_tracer_provider

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    if name in ("TaskContextSpanProcessor", "install_span_processor"):  # need the SDK
        from otel_taskctx import processor

        return getattr(processor, name)
    raise AttributeError(f"module 'otel_taskctx' has no attribute {name!r}")


__all__ = [
    "ConflictStoreUnavailable",
    "DescendantConflict",
    "FanOutChildFailed",
    "FanOutUnavailable",
    "Registration",
    "TaskContextError",
    "TaskContextSpanProcessor",
    "TaskIdentity",
    "allow_nested_async",
    "configure_signing",
    "current_task",
    "extract",
    "fan_out",
    "flush_progress",
    "get_conflict_store",
    "inject",
    "install_propagator_filter",
    "install_span_processor",
    "join_tracer_provider",
    "keep_locks_alive",
    "register_descendants",
    "report_progress",
    "run_inline",
    "skip_nested_async",
    "task_context",
]
