"""The task context in a job's threads: OpenTelemetry's threading instrumentation, unless the
host instrumented or disabled it.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger("otel_taskctx.instrumentation")

_lock = threading.Lock()
_ours = False


def disabled_by_host() -> bool:
    names = {
        n.strip() for n in os.environ.get("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", "").split(",")
    }
    return "threading" in names or "*" in names


def _instrumentor():
    try:
        from opentelemetry.instrumentation.threading import ThreadingInstrumentor
    except ImportError:  # a dependency of ours, but an environment may lack it
        log.warning(
            "opentelemetry-instrumentation-threading is missing: threads of a job do not see its task"
        )
        return None
    return ThreadingInstrumentor()


def instrument_threads() -> bool:
    """True when threading is instrumented for us (by this call or an earlier one)."""
    global _ours
    with _lock:
        if _ours or disabled_by_host():
            return _ours
        instrumentor = _instrumentor()
        if instrumentor is None or instrumentor.is_instrumented_by_opentelemetry:
            return False  # the host's: it serves us as it is
        instrumentor.instrument()
        _ours = bool(instrumentor.is_instrumented_by_opentelemetry)
        return _ours


def uninstrument_threads() -> None:
    global _ours
    with _lock:
        instrumentor = _instrumentor() if _ours else None
        _ours = False
        if instrumentor is not None and instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()


def instrumented_by_us() -> bool:
    return _ours
