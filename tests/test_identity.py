"""Baggage is untrusted: forged, tampered, expired, oversized and garbage identity is ignored."""

import base64
import json
import logging

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry import baggage, context

from otel_taskctx import current_task, skip_nested_async, task_context
from otel_taskctx.context import attached
from otel_taskctx.identity import (
    BAGGAGE_ENTRY,
    MAX_TOKEN_LENGTH,
    TaskIdentity,
    configure_signing,
    sign,
    verify_cached,
)


def _with_token(token):
    return attached(baggage.set_baggage(BAGGAGE_ENTRY, token, context.Context()))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_a_token_we_issued_is_accepted():
    token = sign(TaskIdentity("job-7", "powercrud.async_manager.AsyncManager"))
    with _with_token(token):
        ident = current_task()
    assert ident.task_key == "job-7"
    assert ident.manager_class_path == "powercrud.async_manager.AsyncManager"


def test_unsigned_forgery_is_ignored(caplog):
    payload = _b64(json.dumps({"k": "evil", "x": 2**40}).encode())
    with caplog.at_level(logging.DEBUG, logger="otel_taskctx"):
        with _with_token(f"v1.{payload}.{_b64(b'0' * 16)}"):
            assert current_task() is None
            assert skip_nested_async() is False
    assert "bad signature" in caplog.text


def test_plain_task_key_in_baggage_is_ignored():
    with _with_token("some-task-key"):
        assert current_task() is None


def test_tampered_payload_is_ignored():
    token = sign(TaskIdentity("job-1"))
    version, body, mac = token.split(".")
    data = json.loads(base64.urlsafe_b64decode(body + "=="))
    data["k"] = "job-2"
    forged = f"{version}.{_b64(json.dumps(data, separators=(',', ':')).encode())}.{mac}"
    with _with_token(forged):
        assert current_task() is None


def test_tampered_signature_is_ignored():
    token = sign(TaskIdentity("job-1"))
    flipped = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    with _with_token(flipped):
        assert current_task() is None


def test_expired_token_is_ignored(caplog):
    token = sign(TaskIdentity("old"), ttl_seconds=-10)
    with caplog.at_level(logging.DEBUG, logger="otel_taskctx"):
        with _with_token(token):
            assert current_task() is None
    assert "expired" in caplog.text


def test_token_from_another_deployment_is_ignored():
    configure_signing("other-deployment-secret")
    foreign = sign(TaskIdentity("theirs"))
    configure_signing("tests-secret-key-not-for-production")
    with _with_token(foreign):
        assert current_task() is None


def test_key_rotation_fallback_still_verifies():
    configure_signing("old-secret")
    token = sign(TaskIdentity("in-flight"))
    configure_signing("new-secret", fallbacks=["old-secret"])
    with _with_token(token):
        assert current_task().task_key == "in-flight"
    configure_signing("new-secret")
    with _with_token(token):
        assert current_task() is None


def test_oversized_token_is_ignored_unread():
    token = sign(TaskIdentity("job"))
    with _with_token(token + "x" * MAX_TOKEN_LENGTH):
        assert current_task() is None


def test_non_string_baggage_value_is_ignored():
    with _with_token(12345):
        assert current_task() is None


def test_signed_payload_with_bad_fields_is_rejected():
    """Even a correctly signed token must carry well-formed fields (defence in depth)."""
    from otel_taskctx import identity as mod

    mod._ensure_keys()
    for payload in (
        {"k": "", "x": 2**40},
        {"k": "ok", "x": "soon"},
        {"k": "ok", "x": 2**40, "d": -1},
        {"k": "ok", "x": 2**40, "m": "not a path"},
        ["k", "ok"],
    ):
        body = _b64(json.dumps(payload).encode())
        signed = f"v1.{body}"
        token = f"{signed}.{_b64(mod._mac(mod._keys.current, signed.encode()))}"
        assert verify_cached(token) is None, payload


def test_identity_is_one_compact_entry():
    with task_context("3f2b9c1e-7a1d-4c59-9a53-2f7f1d8e9a10", "powercrud.async_manager.AsyncManager"):
        entries = baggage.get_all()
    assert list(entries) == [BAGGAGE_ENTRY]
    assert len(entries[BAGGAGE_ENTRY]) < 300


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.text(max_size=2000),
        st.binary(max_size=500).map(lambda b: "v1." + _b64(b) + "." + _b64(b[:16])),
        st.tuples(st.text(max_size=50), st.text(max_size=50)).map(lambda t: f"v1.{t[0]}.{t[1]}"),
        st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=20), max_size=6).map(
            lambda d: "v1." + _b64(json.dumps(d).encode()) + "." + _b64(b"\x00" * 16)
        ),
    )
)
def test_garbage_baggage_never_counts_and_never_raises(value):
    with _with_token(value):
        assert current_task() is None
        assert skip_nested_async() is False
