"""The task context in threads started inside a job (opentelemetry-instrumentation-threading).

The OpenTelemetry context, and with it the task identity, lives in a ``ContextVar``: a
``threading.Thread`` or a ``concurrent.futures.ThreadPoolExecutor`` worker started inside a
job begins with an empty context, so ``current_task()`` is None there and a nested launch
from it would escape to the queue unlocked. OpenTelemetry's own threading instrumentation
copies the context at ``Thread.start()``, ``Timer.start()`` and ``ThreadPoolExecutor.submit()``
into the new thread (it records no telemetry of its own).

The taskctx instrumentor turns it on when it patches, and only if the host has not:

* already instrumented (``ThreadingInstrumentor`` is a singleton: ``opentelemetry-instrument``
  or the host's own call): that instrumentation serves us as it is and stays the host's;
* disabled it (``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS`` names ``threading``, the setting
  ``opentelemetry-instrument`` honours): then threads keep starting with an empty context.

``uninstrument_threads()`` undoes only what ``instrument_threads()`` did.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger("otel_taskctx.instrumentation")

#: The entry-point name of OpenTelemetry's threading instrumentation.
ENTRY_POINT = "threading"
_DISABLED_ENV = "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS"

_lock = threading.Lock()
_ours = False


def disabled_by_host() -> bool:
    """True when ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS`` names the threading instrumentation
    (or is ``*``)."""
    names = {name.strip() for name in os.environ.get(_DISABLED_ENV, "").split(",")}
    return ENTRY_POINT in names or "*" in names


def _instrumentor():
    try:
        from opentelemetry.instrumentation.threading import ThreadingInstrumentor
    except ImportError:  # a dependency of ours, but an environment may lack it
        log.warning(
            "opentelemetry-instrumentation-threading is not installed: threads started inside "
            "a job do not see its task"
        )
        return None
    return ThreadingInstrumentor()


def instrument_threads() -> bool:
    """Carry the context into new threads unless the host instrumented or disabled that
    itself. True when this call (or an earlier one) instrumented threading for us."""
    global _ours
    with _lock:
        if _ours:
            return True
        if disabled_by_host():
            log.debug("threading instrumentation disabled by %s", _DISABLED_ENV)
            return False
        instrumentor = _instrumentor()
        if instrumentor is None or instrumentor.is_instrumented_by_opentelemetry:
            return False  # the host's: it serves us as it is
        instrumentor.instrument()
        _ours = bool(instrumentor.is_instrumented_by_opentelemetry)
        return _ours


def uninstrument_threads() -> None:
    """Undo :func:`instrument_threads`; leave threading alone if the host instrumented it."""
    global _ours
    with _lock:
        if not _ours:
            return
        _ours = False
        instrumentor = _instrumentor()
        if instrumentor is not None and instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()


def instrumented_by_us() -> bool:
    return _ours
