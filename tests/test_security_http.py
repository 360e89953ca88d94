"""Forged identity over HTTP never counts; identity never leaves a job on outbound HTTP.

opentelemetry-instrumentation-django extracts inbound ``baggage`` headers with the global
propagator, and inbound values override local ones. The otel_taskctx app wraps that propagator,
so no header can make a request look like a job.
"""

import base64
import http.server
import json
import threading
import urllib.request

import pytest
from django.test import Client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.instrumentation.django import DjangoInstrumentor
from opentelemetry.instrumentation.urllib import URLLibInstrumentor
from opentelemetry.sdk.trace import TracerProvider

from otel_taskctx import current_task, task_context
from otel_taskctx.identity import TaskIdentity, configure_signing, sign
from otel_taskctx.propagation import install_propagator_filter, uninstall_propagator_filter

pytestmark = pytest.mark.django_db
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
def django_otel():
    instrumentor = DjangoInstrumentor()
    instrumentor.instrument(tracer_provider=TracerProvider())
    yield
    instrumentor.uninstrument()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _genuine(task_key="job-http", **kw):
    return sign(TaskIdentity(task_key, "powercrud.async_manager.AsyncManager"), **kw)


def _hostile_tokens():
    """(label, baggage value) for every kind of hostile identity."""
    genuine = _genuine()
    version, body, mac = genuine.split(".")
    tampered_body = _b64(json.dumps({"k": "job-evil", "x": 2**40}).encode())
    configure_signing("another-deployment-secret")
    foreign = _genuine("their-job")
    configure_signing("tests-secret-key-not-for-production")
    return [
        ("forged-unsigned", f"v1.{tampered_body}.{_b64(b'x' * 16)}"),
        ("forged-no-mac", f"v1.{tampered_body}"),
        ("plain-task-key", "3f2b9c1e-7a1d-4c59-9a53-2f7f1d8e9a10"),
        ("another-deployment", foreign),
        ("tampered-payload", f"{version}.{tampered_body}.{mac}"),
        ("tampered-mac", f"{version}.{body}.{mac[::-1]}"),
        ("expired", _genuine(ttl_seconds=-60)),
        ("oversized", genuine + "A" * 5000),
        # even a genuine, unexpired token of this deployment: HTTP never carries identity
        ("genuine-replayed", genuine),
    ]


def _probe(client, baggage_header):
    response = client.get(
        "/probe/nested/", HTTP_BAGGAGE=baggage_header, HTTP_TRACEPARENT=TRACEPARENT
    )
    assert response.status_code == 200, response.content[:500]
    return response.json()


def _escaped(result):
    return result["task"] is not None or result["skip"] or result["registered"]


def test_hostile_identities_over_http_never_count(django_otel, cache):
    client = Client()
    cases = _hostile_tokens()
    escapes = []
    for label, token in cases:
        result = _probe(client, f"taskctx={token},tenant=acme")
        if _escaped(result) or result["enqueued"] != 1:
            escapes.append((label, result))
    assert len(cases) == 9
    assert escapes == []
    # nothing was locked by any request
    assert [k for k in _lock_keys()] == []


def _lock_keys():
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT cache_key FROM taskctx_cache WHERE cache_key LIKE '%powercrud:conflict%'"
        )
        return [row[0] for row in cursor.fetchall()]


@pytest.fixture
def no_filter():
    uninstall_propagator_filter()
    yield
    install_propagator_filter()


def test_control_without_the_filter_a_genuine_token_would_escape(django_otel, no_filter, cache):
    """Shows the test above can fail: the filter is what stops the replayed token."""
    result = _probe(Client(), f"taskctx={_genuine()}")
    assert result["task"] == "job-http"
    assert result["enqueued"] == 0 or result["registered"]


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.one_of(
        st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=300).map(
            lambda v: f"taskctx={v}"
        ),
        st.binary(max_size=200).map(lambda b: f"taskctx=v1.{_b64(b)}.{_b64(b[:16])}"),
        st.lists(
            st.tuples(
                st.sampled_from(["taskctx", "TaskCtx", "taskctx ", "tenant", "k"]),
                st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.=%;", max_size=80),
            ),
            max_size=8,
        ).map(lambda pairs: ",".join(f"{k}={v}" for k, v in pairs)),
    )
)
def test_random_baggage_headers_never_count(django_otel, header):
    result = _probe(Client(), header)
    assert not _escaped(result), (header, result)
    assert result["enqueued"] == 1


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[dict] = []

    def do_GET(self):  # noqa: N802
        _Recorder.seen.append({k.lower(): v for k, v in self.headers.items()})
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def local_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Recorder.seen = []
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_outbound_http_from_a_job_carries_trace_context_but_no_identity(local_server):
    from opentelemetry import baggage, context

    provider = TracerProvider()
    instrumentor = URLLibInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        token = context.attach(baggage.set_baggage("tenant", "acme"))
        try:
            with task_context("job-egress"):
                with provider.get_tracer("t").start_as_current_span("job"):
                    assert current_task().task_key == "job-egress"
                    urllib.request.urlopen(local_server, timeout=10).read()
        finally:
            context.detach(token)
    finally:
        instrumentor.uninstrument()
    (headers,) = _Recorder.seen
    assert headers["traceparent"].startswith("00-")
    assert "taskctx" not in headers.get("baggage", "")
    assert "tenant=acme" in headers["baggage"]
