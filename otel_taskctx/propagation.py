"""Carrying the context across processes, and keeping the identity off everything else.

:func:`inject` / :func:`extract` are the private channel for task packages: they always use
W3C trace context + W3C baggage, whatever the global propagator is, and verify the identity
on the way in.

The global propagator (what HTTP client and server instrumentations use) must neither accept
an identity from an inbound request nor leak one to an outbound call:
:func:`install_propagator_filter` wraps it in :class:`IdentityFilteringPropagator`.
"""

from __future__ import annotations

import logging
import string
import time
from collections.abc import MutableMapping
from dataclasses import replace
from typing import Any

from opentelemetry import baggage, propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context, get_current
from opentelemetry.propagators import textmap
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from otel_taskctx.context import (
    context_with_identity,
    context_without_identity,
    remember_verified,
)
from otel_taskctx.identity import (
    BAGGAGE_ENTRY,
    MAX_TOKEN_LENGTH,
    InvalidIdentity,
    TaskIdentity,
    verify,
)

log = logging.getLogger("otel_taskctx.propagation")

_trace_propagator = TraceContextTextMapPropagator()
_baggage_propagator = W3CBaggagePropagator()
#: Carrier fields written by :func:`inject`.
CARRIER_FIELDS = ("traceparent", "tracestate", "baggage")
MAX_CARRIER_VALUE = 8192


#: the characters of a signed identity as :func:`otel_taskctx.identity.sign` writes it: ones
#: that W3C baggage carries as they are (no percent-encoding), so the entry can be written and
#: read without the W3C propagator's parsing (the common package: the identity and nothing else)
_PLAIN_CHARS = string.ascii_letters + string.digits + "_.-"
_IDENTITY_PREFIX = f"{BAGGAGE_ENTRY}="


def _is_plain_token(value: str) -> bool:
    """``value`` is 1 to ``MAX_TOKEN_LENGTH`` of :data:`_PLAIN_CHARS` (``str.strip`` leaves
    nothing: as exact as a regular expression, and cheaper where it runs, once per job between
    other work)."""
    return 0 < len(value) <= MAX_TOKEN_LENGTH and not value.strip(_PLAIN_CHARS)


_HEX_DIGITS = "0123456789abcdef"


def _write_traceparent(carrier: MutableMapping[str, str], ctx: Context) -> None:
    """The W3C trace-context propagator's ``inject``: written here for a span context without
    trace state (the common package), the propagator's own call otherwise."""
    span_context = trace.get_current_span(ctx).get_span_context()
    if span_context.trace_state:
        _trace_propagator.inject(carrier, context=ctx)
    elif span_context != trace.INVALID_SPAN_CONTEXT:
        carrier["traceparent"] = (
            f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-"
            f"{span_context.trace_flags:02x}"
        )


def _read_traceparent(carrier: dict[str, str], ctx: Context) -> Context:
    """The W3C trace-context propagator's ``extract``, without its regular expression for a
    version-00 ``traceparent`` exactly as :func:`inject` writes it and no ``tracestate``;
    anything else (other versions, whitespace, extra fields, zero ids, trace state) goes
    through the propagator."""
    value = carrier.get("traceparent")
    if (
        value is None
        or "tracestate" in carrier
        or len(value) != 55
        or not value.startswith("00-")
        or value[35] != "-"
        or value[52] != "-"
        or value[3:35].strip(_HEX_DIGITS)
        or value[36:52].strip(_HEX_DIGITS)
        or value[53:].strip(_HEX_DIGITS)
    ):
        return _trace_propagator.extract(carrier, context=ctx)
    trace_id, span_id = int(value[3:35], 16), int(value[36:52], 16)
    if not trace_id or not span_id:
        return ctx
    span_context = trace.SpanContext(
        trace_id=trace_id,
        span_id=span_id,
        is_remote=True,
        trace_flags=trace.TraceFlags(int(value[53:], 16)),
    )
    return trace.set_span_in_context(trace.NonRecordingSpan(span_context), ctx)


def inject(
    carrier: MutableMapping[str, str],
    context: Context | None = None,
    token: str | None = None,
) -> None:
    """Write ``traceparent``/``tracestate``/``baggage`` of ``context`` into ``carrier``.

    ``token`` (a signed identity) replaces the identity of ``context``, if any. The identity
    entry is written first, so the W3C limits (64 entries, 8 KB) that may cut a user's large
    baggage never cut the identity.
    """
    ctx = context if context is not None else get_current()
    _write_traceparent(carrier, ctx)
    entries = baggage.get_all(ctx)
    if token is None:
        token = entries.get(BAGGAGE_ENTRY)
    if token is None:
        _baggage_propagator.inject(carrier, context=ctx)
        return
    others = {name: value for name, value in entries.items() if name != BAGGAGE_ENTRY}
    if not others and isinstance(token, str) and _is_plain_token(token):
        carrier["baggage"] = f"{BAGGAGE_ENTRY}={token}"  # what the W3C propagator writes
        return
    ctx = baggage.set_baggage(BAGGAGE_ENTRY, token, baggage.clear(ctx))
    for name, value in others.items():
        ctx = baggage.set_baggage(name, value, ctx)
    _baggage_propagator.inject(carrier, context=ctx)


def _clean_carrier(carrier: object) -> dict[str, str]:
    """Only string values of known fields, of sane size; anything else is dropped."""
    if not isinstance(carrier, dict):
        if carrier is not None:
            log.warning("ignoring trace carrier of type %s", type(carrier).__name__)
        return {}
    clean: dict[str, str] = {}
    for field in CARRIER_FIELDS:
        value = carrier.get(field)
        if value is None:
            continue
        if not isinstance(value, str) or len(value) > MAX_CARRIER_VALUE:
            log.warning("ignoring malformed %r entry in trace carrier", field)
            continue
        clean[field] = value
    return clean


def extract(carrier: Any, context: Context | None = None) -> Context:
    """Read trace context and baggage from ``carrier`` onto ``context``; verify the identity.

    Malformed carriers are ignored (with a warning); an identity that this deployment did not
    issue is removed from the baggage of the returned context.
    """
    if context is None:
        context = Context()
    clean = _clean_carrier(carrier)
    try:
        ctx = _read_traceparent(clean, context)
        ctx = _read_baggage(clean, ctx)
    except Exception as exc:  # defensive: a propagator must never fail the job
        log.warning("could not extract trace context from carrier: %s", exc)
        return context
    return remember_verified(ctx)


def extract_bound(carrier: Any, bound_to: str) -> tuple[Context, TaskIdentity | None, str]:
    """Read a carrier that the library stored for the queued task ``bound_to`` (a
    ``django.tasks`` result id): ``(context, identity, refusal)``.

    The identity counts only if it verifies and was issued for ``bound_to``; otherwise it is
    removed from the context and ``refusal`` says why ("" when there was no identity, or it was
    accepted). The binding, not the expiry, is what ties the identity to its task, so an
    identity that expired while its task waited (``run_after``) is issued again for the run.
    """
    clean = _clean_carrier(carrier)
    try:
        ctx = _read_baggage(clean, _read_traceparent(clean, Context()))
    except Exception as exc:  # defensive: a propagator must never fail the task
        log.warning("could not extract trace context from carrier: %s", exc)
        return Context(), None, "the carrier could not be read"
    token = baggage.get_baggage(BAGGAGE_ENTRY, ctx)
    if token is None:
        return ctx, None, ""
    try:
        identity = verify(token, now=0)  # signature and shape; the binding replaces the expiry
    except InvalidIdentity as exc:
        return context_without_identity(ctx), None, f"it does not verify ({exc})"
    if identity.bound_to != bound_to:
        issued = identity.bound_to or "no queued task"
        return context_without_identity(ctx), None, f"it was issued for {issued}"
    if identity.expires_at is not None and identity.expires_at < time.time():
        identity = replace(identity, expires_at=None)
        return context_with_identity(identity, ctx=ctx), identity, ""
    return context_with_identity(identity, token, ctx), identity, ""


def _read_baggage(carrier: dict[str, str], ctx: Context) -> Context:
    """The W3C baggage propagator's ``extract``, without its parsing for a package that
    carries the identity alone."""
    value = carrier.get("baggage", "")
    if value.startswith(_IDENTITY_PREFIX) and _is_plain_token(value[len(_IDENTITY_PREFIX) :]):
        return baggage.set_baggage(BAGGAGE_ENTRY, value[len(_IDENTITY_PREFIX) :], ctx)
    return _baggage_propagator.extract(carrier, context=ctx)


class IdentityFilteringPropagator(textmap.TextMapPropagator):
    """Wraps a propagator so the task identity neither comes in nor goes out through it."""

    def __init__(self, inner: textmap.TextMapPropagator) -> None:
        self.inner = inner

    def extract(
        self,
        carrier: textmap.CarrierT,
        context: Context | None = None,
        getter: textmap.Getter[textmap.CarrierT] = textmap.default_getter,
    ) -> Context:
        base = context if context is not None else get_current()
        ctx = self.inner.extract(carrier, context=base, getter=getter)
        before = baggage.get_baggage(BAGGAGE_ENTRY, base)
        after = baggage.get_baggage(BAGGAGE_ENTRY, ctx)
        if after is not None and after is not before:
            log.debug("dropping task identity received through the global propagator")
            if before is None:
                ctx = baggage.remove_baggage(BAGGAGE_ENTRY, ctx)
            else:
                ctx = baggage.set_baggage(BAGGAGE_ENTRY, before, ctx)
        return ctx

    def inject(
        self,
        carrier: textmap.CarrierT,
        context: Context | None = None,
        setter: textmap.Setter[textmap.CarrierT] = textmap.default_setter,
    ) -> None:
        ctx = context if context is not None else get_current()
        if baggage.get_baggage(BAGGAGE_ENTRY, ctx) is not None:
            ctx = baggage.remove_baggage(BAGGAGE_ENTRY, ctx)
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
