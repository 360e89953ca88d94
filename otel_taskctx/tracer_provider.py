"""The tracer provider behind otel_taskctx's spans and processors, never taken from the host.

otel_taskctx never calls ``trace.set_tracer_provider``. Its span processors (the task-context
processor, the span store) and the spans of its instrumentation go to

* the host's SDK ``TracerProvider`` once the host has set one globally, before or after
  ``django.setup()``: our processors join it (:func:`join_tracer_provider`), and its sampler,
  resource and exporters apply to our spans too (theirs wins);
* until then, a private SDK ``TracerProvider`` of our own (:func:`private_tracer_provider`,
  created at first use and never made global): only otel_taskctx's own spans reach it; the
  host's API spans stay non-recording, as they are without otel_taskctx.

The tracers of :data:`TASKCTX_TRACER_PROVIDER` (the instrumentor's) look at the global provider
at each span start until the host sets one, so a provider set later is joined at our next span;
a host that wants its own spans processed before that calls :func:`join_tracer_provider` once
after ``trace.set_tracer_provider(...)``.

What was added where is kept in this module (weakly, by provider): the SDK has no public way to
list a provider's processors, and we set no attribute on its objects.
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
#: name -> [factory, processor (None until made), private only]: our processors, for every
#: provider we use (those for our private provider only are made when it is set up)
_registered: dict[str, list[Any]] = {}
#: provider -> {name: processor} added to it by otel_taskctx
_added: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()
#: providers created by otel_taskctx (:func:`create_sdk_tracer_provider`)
_created: weakref.WeakSet[Any] = weakref.WeakSet()
_private: Any = None


def _sdk_provider_class() -> Any | None:
    try:
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:  # pragma: no cover - the SDK is an optional runtime piece
        return None
    return TracerProvider


def create_sdk_tracer_provider() -> Any:
    """A new SDK ``TracerProvider`` (``OTEL_*`` resource and sampler), marked as ours; never
    set globally."""
    provider = _sdk_provider_class()()
    _created.add(provider)
    return provider


def created_here(provider: Any) -> bool:
    """True when ``provider`` came from :func:`create_sdk_tracer_provider`."""
    try:
        return provider in _created
    except TypeError:  # pragma: no cover - not weakly referenceable
        return False


def host_tracer_provider() -> Any | None:
    """The provider the host set globally, or None while it is the API's proxy."""
    provider = trace.get_tracer_provider()
    return None if isinstance(provider, trace.ProxyTracerProvider) else provider


def private_tracer_provider(create: bool = True) -> Any | None:
    """Our own SDK provider for when the host has none (created at first use)."""
    global _private
    if _private is None and create and _sdk_provider_class() is not None:
        with _lock:
            if _private is None:
                provider = create_sdk_tracer_provider()
                _join(provider, private=True)
                _private = provider
                log.debug("no tracer provider configured: otel_taskctx uses a private one")
    return _private


def sdk_tracer_provider(create: bool = True) -> Any | None:
    """The SDK provider our spans and processors use now: the host's global one (joined), or
    our private one (``create``: set it up if needed). None when the host's provider is not
    the SDK's."""
    host = host_tracer_provider()
    if host is None:
        return private_tracer_provider(create)
    cls = _sdk_provider_class()
    if cls is None or not isinstance(host, cls):
        return None
    join_tracer_provider(host)
    return host


def join_tracer_provider(provider: Any = None) -> bool:
    """Add otel_taskctx's processors to ``provider`` (default: the host's global provider).

    Idempotent and cheap. Called at our next span anyway; call it right after your own
    ``trace.set_tracer_provider(...)`` if that comes after ``django.setup()`` and your spans
    before our first one should be processed too. False when there is no SDK provider.
    """
    if provider is None:
        provider = host_tracer_provider()
    if provider is None or not hasattr(provider, "add_span_processor"):
        return False
    _join(provider, private=provider is _private)
    return True


def _join(provider: Any, private: bool) -> None:
    added = _added.get(provider)
    if added is not None and all(
        name in added for name, entry in list(_registered.items()) if private or not entry[2]
    ):
        return
    with _lock:
        added = _added.setdefault(provider, {})
        for name, entry in list(_registered.items()):
            if name not in added and (private or not entry[2]):
                provider.add_span_processor(_instance(entry))
                added[name] = entry[1]


def _instance(entry: list[Any]) -> Any:
    if entry[1] is None:
        entry[1] = entry[0]()
    return entry[1]


def added_processors(provider: Any) -> dict[str, Any]:
    """The span processors otel_taskctx added to ``provider``, by name (a copy)."""
    try:
        return dict(_added.get(provider) or {})
    except TypeError:  # pragma: no cover - not weakly referenceable
        return {}


def registered_processors() -> dict[str, Any]:
    """Every processor otel_taskctx registered in this process, by name (a copy)."""
    return {name: entry[1] for name, entry in _registered.items() if entry[1] is not None}


def add_span_processor_once(
    name: str,
    factory: Callable[[], Any],
    create: bool = True,
    provider: Any = None,
    private_only: bool = False,
) -> Any | None:
    """Our processor ``name`` (made once by ``factory``) on the providers we use.

    Without ``provider`` it is registered for every provider otel_taskctx uses: the host's
    (now, or once it sets one) and our private one (``private_only``: that one only, e.g. the
    exporters for ``OTEL_TRACES_EXPORTER``); ``create=False`` does not set up the private
    provider now. A private-only processor is made when the private provider is set up (at our
    first span: an exporter's thread starts in the process that uses it). With ``provider``:
    added to that provider only, once. Returns the processor (None when not made yet, or when
    the SDK is missing).
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
        if not entry[2]:
            _instance(entry)  # made now (no threads): the same one on every provider
    if entry[2]:
        target = private_tracer_provider(create)
        if target is not None:
            _join(target, private=True)
    else:
        target = sdk_tracer_provider(create)
        if target is not None:
            _join(target, private=target is _private)
    return entry[1]


# --------------------------------------------------------------------------- our tracers


class _Tracer(trace.Tracer):
    """Starts spans on the host's provider once it has one, on our private one until then."""

    def __init__(self, *args: Any) -> None:
        self._args = args
        self._host: Any = None  # the host's tracer: final once found (set-once global)
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
    """The provider otel_taskctx's instrumentation gets its tracer from (never global)."""

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
        ok = True
        seen: list[Any] = []
        for provider in (sdk_tracer_provider(create=False), private_tracer_provider(False)):
            if provider is None or any(provider is p for p in seen):
                continue
            seen.append(provider)
            ok = bool(provider.force_flush(timeout_millis)) and ok
        return ok


#: pass it as ``tracer_provider`` to an instrumentor whose spans should follow the host's
#: provider once set, and go to otel_taskctx's private one before
TASKCTX_TRACER_PROVIDER = TaskCtxTracerProvider()
