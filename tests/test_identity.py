"""Baggage is untrusted: forged, tampered, expired, oversized and garbage identity is ignored."""

import base64
import hashlib
import hmac
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

SECRET = "tests-secret-key-not-for-production"


def _with_token(token):
    return attached(baggage.set_baggage(BAGGAGE_ENTRY, token, context.Context()))


def _mac(secret: str, message: str) -> str:
    """The token MAC by its definition (the test's oracle): Django's signer's HMAC-SHA256 of
    the body under ``sha256("otel_taskctx.identity" + "signer" + secret)``, base64url."""
    key = hashlib.sha256(f"otel_taskctx.identitysigner{secret}".encode()).digest()
    return _b64(hmac.digest(key, message.encode(), "sha256"))


def _token(payload: object, secret: str = SECRET) -> str:
    """A v2 token of ``payload`` signed by definition (not through the code under test)."""
    body = _b64(json.dumps(payload, separators=(",", ":")).encode())
    return f"v2.{body}.{_mac(secret, body)}"


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
        with _with_token(f"v2.{payload}.{_b64(b'0' * 32)}"):
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
    assert verify_cached(_token({"k": "ok", "x": 2**40})).task_key == "ok"  # the oracle signs
    for payload in (
        {"k": "", "x": 2**40},
        {"k": "ok", "x": "soon"},
        {"k": "ok", "x": 2**40, "d": -1},
        {"k": "ok", "x": 2**40, "m": "not a path"},
        ["k", "ok"],
    ):
        assert verify_cached(_token(payload)) is None, payload


def test_identity_is_one_compact_entry():
    with task_context(
        "3f2b9c1e-7a1d-4c59-9a53-2f7f1d8e9a10", "powercrud.async_manager.AsyncManager"
    ):
        entries = baggage.get_all()
    assert list(entries) == [BAGGAGE_ENTRY]
    assert len(entries[BAGGAGE_ENTRY]) < 300


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.text(max_size=2000),
        st.binary(max_size=500).map(lambda b: "v2." + _b64(b) + "." + _b64(b[:32])),
        st.tuples(st.text(max_size=50), st.text(max_size=50)).map(lambda t: f"v2.{t[0]}.{t[1]}"),
        st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=20), max_size=6).map(
            lambda d: "v2." + _b64(json.dumps(d).encode()) + "." + _b64(b"\x00" * 32)
        ),
    )
)
def test_garbage_baggage_never_counts_and_never_raises(value):
    with _with_token(value):
        assert current_task() is None
        assert skip_nested_async() is False


@settings(max_examples=200)
@given(
    secret=st.text(min_size=1, max_size=40),
    task_key=st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1),
)
def test_a_tokens_mac_is_djangos_signer_hmac_sha256_under_the_salted_key(secret, task_key):
    """The MAC by its definition (the test's oracle): Django's ``Signer`` with separator
    ``.`` and salt ``otel_taskctx.identity``: HMAC-SHA256 of the body under
    sha256(salt + "signer" + secret), base64url without padding."""
    configure_signing(secret)
    try:
        version, body, mac = sign(TaskIdentity(task_key[:200]), now=1000).split(".")
        assert version == "v2" and mac == _mac(secret, body)
    finally:
        configure_signing(SECRET)


def test_tokens_are_the_documented_json_and_verify_under_every_configured_key():
    ident = TaskIdentity(
        "job-9", "powercrud.async_manager.AsyncManager", depth=2, root_task_key="r"
    )
    token = sign(ident, now=1000)
    _, body, mac = token.split(".")
    assert json.loads(base64.urlsafe_b64decode(body + "==")) == {
        "k": "job-9",
        "x": 1000 + 24 * 3600,  # IDENTITY_TTL's default
        "m": "powercrud.async_manager.AsyncManager",
        "r": "r",
        "d": 2,
    }
    assert mac == _mac(SECRET, body)
    configure_signing("new-secret", fallbacks=["other"])
    old = sign(ident)
    configure_signing("rotated", fallbacks=["x"])
    assert verify_cached(old) is None  # signed with a key no longer configured
    configure_signing("rotated", fallbacks=["x", "new-secret"])
    assert verify_cached(old).task_key == "job-9"  # the second fallback still verifies


def _reference_task_key_ok(value):
    import re

    return bool(value.strip()) and len(value) <= 200 and not re.search(r"[\x00-\x1f\x7f]", value)


@settings(max_examples=400)
@given(st.text(max_size=60) | st.sampled_from(["job\x7f", "tâche-1", "a\u2028b", " x ", "\t"]))
def test_task_key_validation_matches_its_definition(value):
    from otel_taskctx.identity import validate_task_key

    try:
        accepted = validate_task_key(value) == value
    except ValueError:
        accepted = False
    assert accepted == _reference_task_key_ok(value)


@settings(max_examples=400)
@given(
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}(\.[A-Za-z_][A-Za-z0-9_]{0,8}){1,3}", fullmatch=True)
    | st.text(max_size=30)
    | st.sampled_from(["a.b\n", "a..b", ".a.b", "a.b.", "ä.b", "a", "1a.b"])
)
def test_class_path_validation_matches_its_definition_also_when_remembered(value):
    import re

    from otel_taskctx.identity import validate_class_path

    expected = re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+", value)
    for _ in range(2):  # the second time a valid path comes from the remembered set
        try:
            accepted = validate_class_path(value) == value
        except ValueError:
            accepted = False
        assert accepted == bool(expected), value


def test_class_path_validation_rejects_non_strings_with_value_error():
    from otel_taskctx.identity import validate_class_path

    for value in (["a.b"], 3, b"a.b", {"a": 1}):
        try:
            validate_class_path(value)
        except ValueError:
            continue
        raise AssertionError(f"{value!r} accepted")
