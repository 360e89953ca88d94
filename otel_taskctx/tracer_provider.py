"""The tracer providers otel_taskctx's processors and spans go to; never set globally.

The host's SDK ``TracerProvider`` once it has set one (before or after ``django.setup()``: our
processors join it at our next span, or at :func:`join_tracer_provider`), else a private one
of our own. Imports the OpenTelemetry API only (the SDK when a provider is made), and uses the
SDK's public API only (``add_span_processor``, ``get_tracer``, ``force_flush``): what was added
where is kept here, weakly by provider.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from opentelemetry import trace

log = logging.getLogger("otel_taskctx.tracing")
_lock = threading.RLock()
#: name -> [factory, processor (None until made), for our private provider only]
_registered: dict[str, list[Any]] = {}
#: provider -> {name: processor} added to it by otel_taskctx
_added: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()
_created: weakref.WeakSet[Any] = weakref.WeakSet()
_private: Any = None


def _sdk_provider_class() -> Any | None:
    try:
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:
        return None
    return TracerProvider


def create_sdk_tracer_provider() -> Any:
    """A new SDK ``TracerProvider`` (``OTEL_*`` resource and sampler), marked as ours."""
    _created.add(provider := _sdk_provider_class()())
    return provider


def created_here(provider: Any) -> bool:
    return provider in _created


def host_tracer_provider() -> Any | None:
    """The provider the host set globally, or None while it is the API's proxy."""
    provider = trace.get_tracer_provider()
    return None if isinstance(provider, trace.ProxyTracerProvider) else provider


def private_tracer_provider(create: bool = True) -> Any | None:
    """Our own SDK provider for when the host has none (made at first use)."""
    global _private
    with _lock:
        if _private is None and create and _sdk_provider_class() is not None:
            _join(provider := create_sdk_tracer_provider(), private=True)
            _private = provider
    return _private


def sdk_tracer_provider(create: bool = True) -> Any | None:
    """The SDK provider our spans and processors use now: the host's (joined) or our private
    one; None when the host's provider is not the SDK's."""
    host = host_tracer_provider()
    if host is None:
        return private_tracer_provider(create)
    cls = _sdk_provider_class()
    if cls is None or not isinstance(host, cls):
        return None
    _join(host, private=False)
    return host


def join_tracer_provider(provider: Any = None) -> bool:
    """Add otel_taskctx's processors to ``provider`` (default: the host's global one), once.

    Call it right after your ``trace.set_tracer_provider(...)`` if that comes after
    ``django.setup()`` and your spans before our next one should be processed too.
    """
    provider = provider or host_tracer_provider()
    if provider is None or not hasattr(provider, "add_span_processor"):
        return False
    _join(provider, private=provider is _private)
    return True


def _join(provider: Any, private: bool) -> None:
    wanted = [n for n, entry in list(_registered.items()) if private or not entry[2]]
    added = _added.get(provider)
    if added is not None and all(name in added for name in wanted):
        return
    with _lock:
        added = _added.setdefault(provider, {})
        for name in wanted:
            if name not in added:
                added[name] = _instance(_registered[name])
                provider.add_span_processor(added[name])


def _instance(entry: list[Any]) -> Any:
    if entry[1] is None:
        entry[1] = entry[0]()
    return entry[1]


def added_processors(provider: Any) -> dict[str, Any]:
    """The span processors otel_taskctx added to ``provider``, by name (a copy)."""
    try:
        return dict(_added.get(provider) or {})
    except TypeError:  # None, or not weakly referenceable
        return {}


def registered_processors() -> dict[str, Any]:
    """Every processor otel_taskctx made in this process, by name (a copy)."""
    return {name: entry[1] for name, entry in list(_registered.items()) if entry[1] is not None}


def add_span_processor_once(
    name: str,
    factory: Callable[[], Any],
    create: bool = True,
    provider: Any = None,
    private_only: bool = False,
) -> Any | None:
    """Our processor ``name`` (made once by ``factory``) on the providers we use.

    Without ``provider``: on the host's provider (now, or once it sets one) and on our private
    one (``private_only``: that one only, made when it is set up, at our first span);
    ``create=False`` does not set up the private provider now. With ``provider``: added to it
    only. Returns the processor (None when not made yet, or without the SDK).
    """
    if _sdk_provider_class() is None:
        return None
    with _lock:
        if provider is not None:
            added = _added.setdefault(provider, {})
            if name not in added:
                added[name] = factory()
                provider.add_span_processor(added[name])
            return added[name]
        entry = _registered.setdefault(name, [factory, None, private_only])
        if not private_only:
            _instance(entry)  # the same one on every provider
    target = private_tracer_provider(create) if private_only else sdk_tracer_provider(create)
    if target is not None:
        _join(target, private=target is _private)
    return entry[1]


class _Tracer(trace.Tracer):
    """Starts spans on the host's provider once it has one, on our private one until then."""

    def __init__(self, *args: Any) -> None:
        self._args = args
        self._host: Any = None  # the host's tracer: final once found (the global is set once)
        self._own: Any = None

    def _tracer(self) -> Any:
        if self._host is not None:
            return self._host
        host = host_tracer_provider()
        if host is not None:
            join_tracer_provider(host)
            self._host = host.get_tracer(*self._args)
            return self._host
        if self._own is None:
            provider = private_tracer_provider()
            self._own = trace.NoOpTracer() if provider is None else provider.get_tracer(*self._args)
        return self._own

    def start_span(self, *args: Any, **kwargs: Any) -> Any:
        return self._tracer().start_span(*args, **kwargs)

    @contextlib.contextmanager
    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        with self._tracer().start_as_current_span(*args, **kwargs) as span:
            yield span


class TaskCtxTracerProvider(trace.TracerProvider):
    """The provider otel_taskctx's instrumentation gets its tracers from (never global)."""

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: Any = None,
    ) -> trace.Tracer:
        return _Tracer(
            instrumenting_module_name, instrumenting_library_version, schema_url, attributes
        )

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Flush the provider our spans go to (and our private one, if used before)."""
        providers = {id(p): p for p in (sdk_tracer_provider(False), private_tracer_provider(False))}
        flushed = [p.force_flush(timeout_millis) for p in providers.values() if p is not None]
        return all(flushed)


#: pass it as ``tracer_provider`` to an instrumentor whose spans should follow the host's
#: provider once set, and go to otel_taskctx's private one before
TASKCTX_TRACER_PROVIDER = TaskCtxTracerProvider()
