"""The tracer providers otel_taskctx's processors and spans go to; never set globally.

The host's SDK ``TracerProvider`` once it has set one (our processors join it at our next span,
or at :func:`join_tracer_provider`), else a private one of ours (docs/core.md). The OpenTelemetry
API only at import; the SDK's public API (``add_span_processor``) when a provider is used.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

from opentelemetry import trace

_lock = threading.RLock()
#: name -> (factory, for our private provider only); name -> the processor once made
_factories: dict[str, tuple[Callable[[], Any], bool]] = {}
_made: dict[str, Any] = {}
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
            _private = create_sdk_tracer_provider()
            _join(_private)
    return _private


def sdk_tracer_provider(create: bool = True) -> Any | None:
    """The SDK provider our spans and processors use now (the host's, joined, or our private
    one); None when the host's provider is not the SDK's."""
    host = host_tracer_provider()
    if host is None:
        return private_tracer_provider(create)
    cls = _sdk_provider_class()
    return join_tracer_provider(host) and host if cls and isinstance(host, cls) else None


def join_tracer_provider(provider: Any = None) -> bool:
    """Add otel_taskctx's processors to ``provider`` (default: the host's global one), once:
    right after a ``trace.set_tracer_provider(...)`` made after ``django.setup()``."""
    provider = provider or host_tracer_provider()
    if provider is None or not hasattr(provider, "add_span_processor"):
        return False
    _join(provider)
    return True


def _add(provider: Any, name: str, make: Callable[[], Any]) -> Any:
    """Add the processor ``make()`` to ``provider`` as ``name``, unless it has one (lock held)."""
    added = _added.setdefault(provider, {})
    if name not in added:
        added[name] = make()
        provider.add_span_processor(added[name])
    return added[name]


def _join(provider: Any) -> None:
    private = provider is _private
    names = [n for n, (_, only) in list(_factories.items()) if private or not only]
    if all(n in _added.get(provider, ()) for n in names):
        return
    with _lock:
        for name in names:
            _add(provider, name, lambda name=name: _instance(name))


def _instance(name: str) -> Any:
    if name not in _made:
        _made[name] = _factories[name][0]()
    return _made[name]


def added_processors(provider: Any) -> dict[str, Any]:
    """The span processors otel_taskctx added to ``provider``, by name (a copy)."""
    try:
        return dict(_added.get(provider) or {})
    except TypeError:  # None, or not weakly referenceable
        return {}


def registered_processors() -> dict[str, Any]:
    """Every processor otel_taskctx made in this process, by name (a copy)."""
    return dict(_made)


def add_span_processor_once(
    name: str,
    factory: Callable[[], Any],
    create: bool = True,
    provider: Any = None,
    private_only: bool = False,
) -> Any | None:
    """Our processor ``name`` (made once by ``factory``) on the host's provider (now or once
    set) and our private one (``private_only``: that one only, made with it; ``create=False``:
    not set up now); with ``provider``, on that one only. None if not made yet or no SDK."""
    if _sdk_provider_class() is None:
        return None
    with _lock:
        if provider is not None:
            return _add(provider, name, factory)
        _factories.setdefault(name, (factory, private_only))
        if not private_only:
            _instance(name)  # the same one on every provider
    if private_only:
        if private_tracer_provider(create) is not None:
            _join(_private)
    else:
        sdk_tracer_provider(create)
    return _made.get(name)


class _Tracer(trace.Tracer):
    """Starts spans on the host's provider once it has one, on our private one until then."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        self._args, self._kwargs = args, kwargs
        self._host: Any = None  # the host's tracer: final once found (the global is set once)
        self._own: Any = None

    def _tracer(self) -> Any:
        if self._host is None and (host := host_tracer_provider()) is not None:
            join_tracer_provider(host)
            self._host = host.get_tracer(*self._args, **self._kwargs)
        if self._host is None and self._own is None:
            provider = private_tracer_provider() or trace.NoOpTracerProvider()
            self._own = provider.get_tracer(*self._args, **self._kwargs)
        return self._host or self._own

    def start_span(self, *args: Any, **kwargs: Any) -> Any:
        return self._tracer().start_span(*args, **kwargs)

    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Any:
        return self._tracer().start_as_current_span(*args, **kwargs)


class TaskCtxTracerProvider(trace.TracerProvider):
    """The provider otel_taskctx's instrumentation gets its tracers from (never global)."""

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return _Tracer(args, kwargs)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Flush the provider our spans go to (and our private one, if used before)."""
        providers = {sdk_tracer_provider(False), private_tracer_provider(False)} - {None}
        return all([p.force_flush(timeout_millis) for p in providers])


#: pass it as ``tracer_provider`` to an instrumentor whose spans should follow the host's
#: provider once set, and go to otel_taskctx's private one before
TASKCTX_TRACER_PROVIDER = TaskCtxTracerProvider()
