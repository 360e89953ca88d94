"""Finding (or creating) the SDK tracer provider that our processors attach to.

We never replace a provider, exporter or sampler the application configured: processors are
added to an existing SDK ``TracerProvider``; only when no provider was set at all do we create
one (honouring the standard ``OTEL_*`` environment variables for resource and sampler).

A provider keeps, in attributes of our own, the processors otel_taskctx added to it (by name,
see :func:`added_processors`) and whether otel_taskctx created it (:func:`created_here`): the
SDK has no public way to list a provider's processors.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from opentelemetry import trace

log = logging.getLogger("otel_taskctx.tracing")
_lock = threading.Lock()
_ADDED = "_otel_taskctx_processors"
_CREATED = "_otel_taskctx_created"


def create_sdk_tracer_provider() -> Any:
    """A new SDK ``TracerProvider``, marked as created by otel_taskctx."""
    from opentelemetry.sdk.trace import TracerProvider

    provider = TracerProvider()
    setattr(provider, _CREATED, True)
    return provider


def created_here(provider: Any) -> bool:
    """True when ``provider`` came from :func:`create_sdk_tracer_provider`."""
    return getattr(provider, _CREATED, False) is True


def sdk_tracer_provider(create: bool = True) -> Any | None:
    """The global SDK ``TracerProvider``; set up a new one if none was configured.

    Returns None when the SDK is not installed or another (non-SDK) provider is in use.
    """
    try:
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:  # pragma: no cover - the SDK is an optional runtime piece
        return None
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        return provider
    if not create or not isinstance(provider, trace.ProxyTracerProvider):
        return None
    with _lock:
        provider = trace.get_tracer_provider()
        if isinstance(provider, trace.ProxyTracerProvider):
            trace.set_tracer_provider(create_sdk_tracer_provider())
            log.debug("no tracer provider was configured: created an SDK TracerProvider")
        provider = trace.get_tracer_provider()
    return provider if isinstance(provider, TracerProvider) else None


def added_processors(provider: Any) -> dict[str, Any]:
    """The span processors otel_taskctx added to ``provider``, by the name they were added
    under (a copy)."""
    return dict(getattr(provider, _ADDED, None) or {})


def add_span_processor_once(
    name: str, factory: Callable[[], Any], create: bool = True, provider: Any = None
) -> Any | None:
    """Add ``factory()`` to the SDK provider unless a processor named ``name`` was added.

    ``provider``: that provider instead of the global one (``create`` then does not apply).
    Returns the processor on the provider, or None when there is no SDK provider.
    """
    if provider is None:
        provider = sdk_tracer_provider(create=create)
        if provider is None:
            return None
    with _lock:
        added: dict[str, Any] = getattr(provider, _ADDED, None) or {}
        if name in added:
            return added[name]
        processor = factory()
        provider.add_span_processor(processor)
        added[name] = processor
        setattr(provider, _ADDED, added)
        return processor
