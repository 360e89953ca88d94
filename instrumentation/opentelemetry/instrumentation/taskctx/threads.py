"""The task context in a job's threads: OpenTelemetry's threading instrumentation, unless the
host instrumented or disabled it (``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS``).
"""

from __future__ import annotations

import os
import threading

_lock = threading.Lock()
_ours = False


def instrument_threads() -> None:
    """Instrument threading for us, unless the host did or disabled it."""
    global _ours
    disabled = os.environ.get("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", "").split(",")
    from opentelemetry.instrumentation.threading import ThreadingInstrumentor

    with _lock:
        instrumentor = ThreadingInstrumentor()
        if _ours or {"threading", "*"} & {n.strip() for n in disabled}:
            return
        if not instrumentor.is_instrumented_by_opentelemetry:  # else the host's serves us
            instrumentor.instrument()
            _ours = bool(instrumentor.is_instrumented_by_opentelemetry)


def uninstrument_threads() -> None:
    """Undo our own threading instrumentation only."""
    global _ours
    from opentelemetry.instrumentation.threading import ThreadingInstrumentor

    with _lock:
        instrumentor = ThreadingInstrumentor()
        if _ours and instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()
        _ours = False


def instrumented_by_us() -> bool:
    return _ours
