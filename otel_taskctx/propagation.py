"""The task packages' own channel (:func:`inject` / :func:`extract`: W3C trace context and
baggage, the identity verified on the way in), and the global propagator kept free of it."""

from __future__ import annotations

import logging
import time
from collections.abc import MutableMapping
from dataclasses import replace
from typing import Any

from opentelemetry import baggage, propagate
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context, get_current
from opentelemetry.propagators import textmap
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from otel_taskctx.context import context_with_identity, context_without_identity
from otel_taskctx.identity import BAGGAGE_ENTRY, InvalidIdentity, TaskIdentity, verify
from otel_taskctx.identity import verify_cached as _verify_cached

log = logging.getLogger("otel_taskctx.propagation")

_trace_propagator = TraceContextTextMapPropagator()
_baggage_propagator = W3CBaggagePropagator()
#: the carrier fields :func:`inject` writes and :func:`extract` reads
CARRIER_FIELDS = ("traceparent", "tracestate", "baggage")
MAX_CARRIER_VALUE = 8192


def inject(
    carrier: MutableMapping[str, str], context: Context | None = None, token: str | None = None
) -> None:
    """Write the W3C trace context and baggage of ``context`` into ``carrier``; ``token`` (a
    signed identity) replaces the context's own. The identity goes first: no limit cuts it."""
    ctx = get_current() if context is None else context
    _trace_propagator.inject(carrier, context=ctx)
    entries = dict(baggage.get_all(ctx))
    own = entries.pop(BAGGAGE_ENTRY, None)
    if own is not None or token is not None:
        entries = {BAGGAGE_ENTRY: own if token is None else token, **entries}
    ordered = baggage.clear(ctx)
    for name, value in entries.items():
        ordered = baggage.set_baggage(name, value, ordered)
    _baggage_propagator.inject(carrier, context=ordered)


def _read(carrier: object, ctx: Context) -> Context:
    """``carrier`` onto ``ctx``: string values of known fields and sane size, else a warning."""
    if not isinstance(carrier, dict):
        if carrier is not None:
            log.warning("ignoring trace carrier of type %s", type(carrier).__name__)
        return ctx
    clean: dict[str, str] = {}
    for field in CARRIER_FIELDS:
        value = carrier.get(field)
        if isinstance(value, str) and len(value) <= MAX_CARRIER_VALUE:
            clean[field] = value
        elif value is not None:
            log.warning("ignoring malformed %r entry in trace carrier", field)
    ctx = _trace_propagator.extract(clean, context=ctx)
    return _baggage_propagator.extract(clean, context=ctx)


def extract(carrier: Any, context: Context | None = None) -> Context:
    """Read ``carrier`` onto ``context`` (default: a fresh one) and verify the identity: one
    this deployment did not issue is removed. A malformed carrier gives a warning."""
    ctx = _read(carrier, Context() if context is None else context)
    token = baggage.get_baggage(BAGGAGE_ENTRY, ctx)
    if token is None:
        return ctx
    identity = _verify_cached(token)
    if identity is None:
        return context_without_identity(ctx)
    return context_with_identity(identity, token, ctx)


def extract_bound(carrier: Any, bound_to: str) -> tuple[Context, TaskIdentity | None, str]:
    """``(context, identity, refusal)`` of a carrier stored for the ``django.tasks`` result
    ``bound_to``: its identity counts only if it verifies and was issued for that result, else
    ``refusal`` says why. The binding, not the expiry, ties it to its task."""
    ctx = _read(carrier, Context())
    token = baggage.get_baggage(BAGGAGE_ENTRY, ctx)
    if token is None:
        return ctx, None, ""
    try:
        identity = verify(token, now=0)
    except InvalidIdentity as exc:
        return context_without_identity(ctx), None, f"it does not verify ({exc})"
    if identity.bound_to != bound_to:
        issued = identity.bound_to or "no queued task"
        return context_without_identity(ctx), None, f"it was issued for {issued}"
    if identity.expires_at < time.time():  # it expired while the task waited: issued again
        identity, token = replace(identity, expires_at=None), None
    return context_with_identity(identity, token, ctx), identity, ""


class IdentityFilteringPropagator(textmap.TextMapPropagator):
    """Wraps a propagator so the task identity neither comes in nor goes out through it."""

    def __init__(self, inner: textmap.TextMapPropagator) -> None:
        self.inner = inner

    def extract(self, carrier, context=None, getter=textmap.default_getter) -> Context:
        base = get_current() if context is None else context
        ctx = self.inner.extract(carrier, context=base, getter=getter)
        before = baggage.get_baggage(BAGGAGE_ENTRY, base)
        if baggage.get_baggage(BAGGAGE_ENTRY, ctx) is before:
            return ctx
        log.debug("dropping task identity received through the global propagator")
        if before is None:
            return baggage.remove_baggage(BAGGAGE_ENTRY, ctx)
        return baggage.set_baggage(BAGGAGE_ENTRY, before, ctx)

    def inject(self, carrier, context=None, setter=textmap.default_setter) -> None:
        ctx = baggage.remove_baggage(BAGGAGE_ENTRY, context)
        self.inner.inject(carrier, context=ctx, setter=setter)

    @property
    def fields(self) -> set[str]:
        return set(self.inner.fields)


def install_propagator_filter() -> IdentityFilteringPropagator:
    """Wrap the global propagator (idempotent). Returns the installed wrapper."""
    current = propagate.get_global_textmap()
    if isinstance(current, IdentityFilteringPropagator):
        return current
    wrapper = IdentityFilteringPropagator(current)
    propagate.set_global_textmap(wrapper)
    return wrapper


def uninstall_propagator_filter() -> None:
    current = propagate.get_global_textmap()
    if isinstance(current, IdentityFilteringPropagator):
        propagate.set_global_textmap(current.inner)
