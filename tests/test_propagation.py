"""inject/extract carry the identity; the global propagator neither accepts nor emits it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from opentelemetry import baggage, context, propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from otel_taskctx import current_task, extract, inject, task_context
from otel_taskctx.context import attached, identity_from_context
from otel_taskctx.identity import BAGGAGE_ENTRY
from otel_taskctx.propagation import (
    IdentityFilteringPropagator,
    install_propagator_filter,
    uninstall_propagator_filter,
)

ROOT = Path(__file__).resolve().parents[1]
tracer = TracerProvider().get_tracer("tests")


def test_roundtrip_into_a_fresh_context():
    with task_context("job-rt", "powercrud.async_manager.AsyncManager"):
        with tracer.start_as_current_span("enqueue") as span:
            carrier = {}
            inject(carrier)
            trace_id = span.get_span_context().trace_id
    assert set(carrier) >= {"traceparent", "baggage"}
    assert current_task() is None
    ctx = extract(carrier)
    ident = identity_from_context(ctx)
    assert ident.task_key == "job-rt"
    assert trace.get_current_span(ctx).get_span_context().trace_id == trace_id
    with attached(ctx):
        assert current_task().task_key == "job-rt"
    assert current_task() is None


def test_user_baggage_travels_with_identity():
    with attached(baggage.set_baggage("tenant", "acme")):
        with task_context("job-b"):
            carrier = {}
            inject(carrier)
    assert carrier["baggage"].startswith(f"{BAGGAGE_ENTRY}=")
    ctx = extract(carrier)
    assert baggage.get_baggage("tenant", ctx) == "acme"
    assert identity_from_context(ctx).task_key == "job-b"


def test_identity_survives_a_large_user_baggage():
    big = {f"k{i}": "v" * 100 for i in range(120)}
    ctx = context.Context()
    for k, v in big.items():
        ctx = baggage.set_baggage(k, v, ctx)
    with attached(ctx):
        with task_context("job-big"):
            carrier = {}
            inject(carrier)
    assert len(carrier["baggage"]) <= 8192
    assert identity_from_context(extract(carrier)).task_key == "job-big"


def test_forged_identity_is_removed_on_extract():
    carrier = {"baggage": f"{BAGGAGE_ENTRY}=v2.e30.AAAAAAAAAAAAAAAAAAAAAA,tenant=acme"}
    ctx = extract(carrier)
    assert identity_from_context(ctx) is None
    assert baggage.get_baggage(BAGGAGE_ENTRY, ctx) is None
    assert baggage.get_baggage("tenant", ctx) == "acme"


@pytest.mark.parametrize(
    "carrier",
    [
        None,
        "baggage=x",
        42,
        ["a"],
        {"baggage": 5},
        {"baggage": "x" * 100000},
        {"traceparent": b"00"},
    ],
)
def test_malformed_carriers_give_a_plain_context(carrier, caplog):
    ctx = extract(carrier)
    assert identity_from_context(ctx) is None


def _run_child(carrier, secret):
    code = (
        "import json, sys, django; django.setup();"
        "from otel_taskctx import extract; from otel_taskctx.context import identity_from_context;"
        "i = identity_from_context(extract(json.loads(sys.argv[1])));"
        "print(json.dumps(None if i is None else [i.task_key, i.root_task_key, i.depth]))"
    )
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="tests.settings", TASKCTX_TEST_SECRET=secret)
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(carrier)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_identity_survives_into_another_process_with_the_same_secret(settings):
    with task_context("outer"):
        with task_context("job-proc"):
            carrier = {}
            inject(carrier)
    assert _run_child(carrier, settings.SECRET_KEY) == ["job-proc", "outer", 1]


def test_identity_is_rejected_by_a_process_with_another_secret():
    with task_context("job-proc"):
        carrier = {}
        inject(carrier)
    assert _run_child(carrier, "some-other-deployment") is None


@pytest.fixture
def global_propagator():
    original = propagate.get_global_textmap()
    propagate.set_global_textmap(
        CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])
    )
    yield install_propagator_filter()
    uninstall_propagator_filter()
    propagate.set_global_textmap(original)


def test_global_propagator_does_not_accept_identity(global_propagator):
    with task_context("real-job"):
        good = {}
        inject(good)  # a genuine token: still not accepted over HTTP
    headers = {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "baggage": good["baggage"] + ",tenant=acme",
    }
    ctx = propagate.extract(headers)
    assert baggage.get_baggage(BAGGAGE_ENTRY, ctx) is None
    assert identity_from_context(ctx) is None
    assert baggage.get_baggage("tenant", ctx) == "acme"
    assert (
        trace.get_current_span(ctx).get_span_context().trace_id
        == 0x0AF7651916CD43DD8448EB211C80319C
    )


def test_global_extract_keeps_a_local_identity(global_propagator):
    with task_context("local-job"):
        ctx = propagate.extract({"baggage": "tenant=acme"})
        assert identity_from_context(ctx).task_key == "local-job"


def test_global_propagator_does_not_emit_identity(global_propagator):
    with attached(baggage.set_baggage("tenant", "acme")):
        with task_context("job-out"):
            with tracer.start_as_current_span("call"):
                headers = {}
                propagate.inject(headers)
    assert "traceparent" in headers
    assert BAGGAGE_ENTRY not in headers.get("baggage", "")
    assert "tenant=acme" in headers["baggage"]


def test_filter_install_is_idempotent(global_propagator):
    assert install_propagator_filter() is global_propagator
    assert isinstance(propagate.get_global_textmap(), IdentityFilteringPropagator)
    assert not isinstance(global_propagator.inner, IdentityFilteringPropagator)


def test_django_app_installs_the_filter():
    # tests.settings has otel_taskctx in INSTALLED_APPS with default settings
    assert isinstance(propagate.get_global_textmap(), IdentityFilteringPropagator)


# The package's baggage is the W3C propagator's, with the identity first.
_BAGGAGE_TEXT = st.text(
    alphabet=st.sampled_from("taskcx=v1.AZaz09_-+%,; \t=ä\x00"), min_size=0, max_size=40
)


@settings(max_examples=400, deadline=None)
@given(token=_BAGGAGE_TEXT, others=st.dictionaries(_BAGGAGE_TEXT, _BAGGAGE_TEXT, max_size=3))
@example(token="", others={"": "", BAGGAGE_ENTRY: ""})  # an empty identity of the context's own
@example(token="v1.abc.def", others={BAGGAGE_ENTRY: "other", "tenant": "acme"})
def test_inject_writes_what_the_w3c_propagator_writes(token, others):
    ctx = context.Context()
    for name, value in others.items():
        ctx = baggage.set_baggage(name, value, ctx)
    ours: dict[str, str] = {}
    inject(ours, ctx, token=token or None)
    # reference: the identity (the token given, else the context's own) first, then the other
    # entries, through the W3C propagator
    identity = token or others.get(BAGGAGE_ENTRY)
    reference_ctx = context.Context()
    if identity is not None:
        reference_ctx = baggage.set_baggage(BAGGAGE_ENTRY, identity, reference_ctx)
    for name, value in others.items():
        if name != BAGGAGE_ENTRY:
            reference_ctx = baggage.set_baggage(name, value, reference_ctx)
    reference: dict[str, str] = {}
    W3CBaggagePropagator().inject(reference, context=reference_ctx)
    assert ours.get("baggage") == reference.get("baggage")


@settings(max_examples=600, deadline=None)
@given(
    header=st.one_of(
        _BAGGAGE_TEXT.map(lambda tail: f"{BAGGAGE_ENTRY}={tail}"),
        _BAGGAGE_TEXT,
        st.from_regex(r"taskctx=v1\.[A-Za-z0-9_-]{1,60}\.[A-Za-z0-9_-]{1,30}", fullmatch=True),
    )
)
def test_reading_the_package_baggage_gives_what_the_w3c_propagator_reads(header):
    carrier = {"baggage": header}
    ours = baggage.get_all(extract(carrier))
    reference = dict(baggage.get_all(W3CBaggagePropagator().extract(carrier, context.Context())))
    reference.pop(BAGGAGE_ENTRY, None)  # never a signed identity here: removed by extract()
    assert dict(ours) == reference


# The trace context is the W3C trace-context propagator's, both ways.
def _span_context_of(ctx):
    span_context = trace.get_current_span(ctx).get_span_context()
    return (
        span_context.trace_id,
        span_context.span_id,
        span_context.is_remote,
        int(span_context.trace_flags),
        span_context.trace_state.to_header(),
        span_context.is_valid,
    )


_HEX = st.text(alphabet="0123456789abcdef", min_size=1, max_size=40)


@settings(max_examples=800, deadline=None)
@given(
    traceparent=st.one_of(
        st.tuples(
            st.sampled_from(["00", "01", "ff", "0A", "0"]),
            st.integers(0, 2**128 - 1) | st.just(0),
            st.integers(0, 2**64 - 1) | st.just(0),
            st.integers(0, 255),
            st.sampled_from(["", "-x", " ", "\t", "-"]),
            st.booleans(),
        ).map(
            lambda t: (
                (f"{t[0]}-{t[1]:032x}-{t[2]:016x}-{t[3]:02x}{t[4]}").upper()
                if t[5] and t[1] % 7 == 0
                else f"{t[0]}-{t[1]:032x}-{t[2]:016x}-{t[3]:02x}{t[4]}"
            )
        ),
        st.from_regex(r"00-[0-9a-fA-F]{32}-[0-9a-fA-F]{16}-[0-9a-fA-F]{2}", fullmatch=True),
        st.text(alphabet="0123456789abcdefABx- ", max_size=60),
        _HEX,
    ),
    tracestate=st.none() | st.sampled_from(["", "vendor=1", "a=b,c=d", "bad state"]),
)
@example(traceparent="00-" + "0" * 32 + "-" + "1" * 16 + "-01", tracestate=None)
@example(traceparent="00-" + "1" * 32 + "-" + "0" * 16 + "-01", tracestate=None)
@example(traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01-", tracestate=None)
def test_reading_the_traceparent_gives_what_the_w3c_propagator_reads(traceparent, tracestate):
    carrier = {"traceparent": traceparent}
    if tracestate is not None:
        carrier["tracestate"] = tracestate
    base = baggage.set_baggage("kept", "yes", context.Context())
    ours = extract(carrier, base)
    reference = TraceContextTextMapPropagator().extract(carrier, context=base)
    assert _span_context_of(ours) == _span_context_of(reference)
    assert baggage.get_all(ours) == baggage.get_all(reference)


@settings(max_examples=400, deadline=None)
@given(
    trace_id=st.integers(0, 2**128 - 1),
    span_id=st.integers(0, 2**64 - 1),
    flags=st.integers(0, 255),
    state=st.sampled_from([None, [("vendor", "1")], [("a", "b"), ("c", "d")]]),
)
@example(trace_id=0, span_id=0, flags=0, state=None)
@example(trace_id=0, span_id=5, flags=1, state=None)
def test_writing_the_traceparent_gives_what_the_w3c_propagator_writes(
    trace_id, span_id, flags, state
):
    span_context = trace.SpanContext(
        trace_id=trace_id,
        span_id=span_id,
        is_remote=False,
        trace_flags=trace.TraceFlags(flags),
        trace_state=trace.TraceState(state) if state else None,
    )
    ctx = trace.set_span_in_context(trace.NonRecordingSpan(span_context), context.Context())
    ours: dict[str, str] = {}
    inject(ours, ctx)
    reference: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(reference, context=ctx)
    assert ours == reference
