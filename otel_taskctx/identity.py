"""Signed task identity: what travels in baggage and how it is verified.

The identity is one compact baggage entry (``taskctx``) whose value is a token::

    v1.<base64url(json payload)>.<base64url(hmac-sha256[:16])>

The payload holds the task key, manager class path, parent and root task keys, the nesting
depth, an expiry (unix seconds) and, for a queued ``django.tasks`` task, the id of the task it
was issued for (``bound_to``). The MAC is keyed with a key derived from a secret that
only this deployment knows (``OTEL_TASKCTX["SIGNING_KEY"]`` or Django's ``SECRET_KEY``), so
a ``baggage`` header sent by any HTTP client cannot claim to be a task.

This module depends on the standard library (and the names in :mod:`otel_taskctx.semconv`) only. The secret is provided by
:func:`configure_signing` (the Django app calls it from ``ready()``); if nobody configured
it, the first use reads Django's settings lazily.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from threading import Lock
from typing import Any

from otel_taskctx import semconv

log = logging.getLogger("otel_taskctx.identity")

#: The single baggage entry that carries the identity.
BAGGAGE_ENTRY = "taskctx"
TOKEN_VERSION = "v1"
#: Tokens longer than this are rejected unread (W3C allows 8 KB for the whole header).
MAX_TOKEN_LENGTH = 1024
MAX_TASK_KEY_LENGTH = 200
DEFAULT_TTL_SECONDS = 24 * 3600
_MAC_BYTES = 16
_KEY_SALT = b"otel_taskctx.identity.v1"
_CLASS_PATH_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")
_FORBIDDEN_KEY_CHARS = re.compile(r"[\x00-\x1f\x7f]")


class InvalidIdentity(ValueError):
    """A token that this deployment did not issue, or that is damaged or expired."""


@dataclass(frozen=True, slots=True)
class TaskIdentity:
    """Who is running: the current task and its lineage."""

    task_key: str
    manager_class_path: str | None = None
    root_task_key: str | None = None
    depth: int = 0
    parent_task_key: str | None = None
    expires_at: float | None = None
    #: the id of the one queued task this identity was issued for (a ``django.tasks`` result
    #: id): a worker accepts it for that task only (see :func:`otel_taskctx.propagation.extract_bound`)
    bound_to: str | None = None

    def __post_init__(self) -> None:
        if self.root_task_key is None:
            object.__setattr__(self, "root_task_key", self.task_key)

    def child(self, task_key: str, manager_class_path: str | None = None) -> TaskIdentity:
        """The identity of a task nested inside this one."""
        return TaskIdentity(
            task_key=task_key,
            manager_class_path=manager_class_path or self.manager_class_path,
            root_task_key=self.root_task_key,
            depth=self.depth + 1,
            parent_task_key=self.task_key,
        )

    def lineage_attributes(self) -> dict[str, str | int]:
        """Span attributes describing this task's place in its job tree."""
        attrs: dict[str, str | int] = {
            semconv.TASK_KEY: self.task_key,
            semconv.ROOT_TASK_KEY: self.root_task_key or self.task_key,
            semconv.DEPTH: self.depth,
        }
        if self.parent_task_key:
            attrs[semconv.PARENT_TASK_KEY] = self.parent_task_key
        if self.manager_class_path:
            attrs[semconv.MANAGER_CLASS_PATH] = self.manager_class_path
        return attrs


def validate_task_key(task_key: object) -> str:
    if not isinstance(task_key, str) or not task_key.strip():
        raise ValueError(f"task_key must be a non-empty string, got {task_key!r}")
    if len(task_key) > MAX_TASK_KEY_LENGTH:
        raise ValueError(f"task_key is longer than {MAX_TASK_KEY_LENGTH} characters")
    # (printable ASCII has no control character: the common key never meets the regex)
    if not (task_key.isascii() and task_key.isprintable()) and _FORBIDDEN_KEY_CHARS.search(
        task_key
    ):
        raise ValueError("task_key must not contain control characters")
    return task_key


#: manager class paths already found valid (a deployment has a handful): a set lookup instead
#: of the regex for each of them
_valid_class_paths: set[str] = set()


def validate_class_path(path: object) -> str | None:
    if path is None:
        return None
    if not isinstance(path, str):
        raise ValueError(f"manager_class_path must be a dotted Python path, got {path!r}")
    if path in _valid_class_paths:
        return path
    if not _CLASS_PATH_RE.fullmatch(path):
        raise ValueError(f"manager_class_path must be a dotted Python path, got {path!r}")
    if len(_valid_class_paths) < 256:
        _valid_class_paths.add(path)
    return path


# --------------------------------------------------------------------------- keys


class _Keys:
    def __init__(self) -> None:
        self.lock = Lock()
        self.current: bytes | None = None
        #: keyed HMAC objects of the current key and of every key that verifies (the current
        #: one and the fallbacks), copied per token (see :func:`_keyed`)
        self.signer: Any = None
        self.verifiers: tuple[Any, ...] = ()
        self.generation = 0
        self.ttl = DEFAULT_TTL_SECONDS
        self.provider: Callable[[], tuple[str | bytes, Iterable[str | bytes], int]] | None = None


_keys = _Keys()
#: called (without arguments) whenever the keys change, to drop memoised verifications
key_change_listeners: list[Callable[[], None]] = []


def _keys_changed() -> None:
    _verified_cache.clear()
    for listener in key_change_listeners:
        listener()


def _derive(secret: str | bytes) -> bytes:
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    return hashlib.sha256(_KEY_SALT + b"\x00" + secret).digest()


def configure_signing(
    secret: str | bytes,
    fallbacks: Iterable[str | bytes] = (),
    ttl_seconds: int = DEFAULT_TTL_SECONDS,
) -> None:
    """Set the secret that signs identities (``fallbacks`` still verify, for key rotation)."""
    if not secret:
        raise ValueError("the signing secret must not be empty")
    derived = _derive(secret)
    every = (derived, *(_derive(f) for f in fallbacks if f))
    with _keys.lock:
        _keys.current = derived
        _keys.signer = _keyed(derived)
        _keys.verifiers = tuple(_keyed(key) for key in every)
        _keys.ttl = int(ttl_seconds)
        _keys.generation += 1
    _keys_changed()


def set_key_provider(
    provider: Callable[[], tuple[str | bytes, Iterable[str | bytes], int]] | None,
) -> None:
    """Register a callable returning ``(secret, fallbacks, ttl)``, used on first need."""
    _keys.provider = provider


def reset_signing() -> None:
    """Forget the configured secret (tests; the provider is asked again on next use)."""
    with _keys.lock:
        _keys.current = None
        _keys.signer = None
        _keys.verifiers = ()
        _keys.generation += 1
    _keys_changed()


def _django_provider() -> tuple[str | bytes, Iterable[str | bytes], int]:
    from otel_taskctx.conf import signing_settings  # lazy: Django-facing

    return signing_settings()


def _ensure_keys() -> bool:
    if _keys.current is not None:
        return True
    provider = _keys.provider or _django_provider
    try:
        secret, fallbacks, ttl = provider()
    except Exception as exc:  # no Django, settings not configured, ...
        log.debug("no signing secret available: %s", exc)
        return False
    if not secret:
        return False
    configure_signing(secret, fallbacks, ttl)
    return True


# --------------------------------------------------------------------------- tokens


def _b64e(data: bytes) -> str:
    """base64url without padding (the token's encoding)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    """The bytes of unpadded base64url ``text`` (``ValueError`` for anything else)."""
    data = text.encode("ascii")
    return base64.urlsafe_b64decode(data + b"=" * (-len(data) % 4))


def _keyed(key: bytes) -> Any:
    """An HMAC-SHA256 object keyed with ``key`` once; ``_keyed_mac`` copies it per message."""
    return hmac.new(key, digestmod=hashlib.sha256)


def _keyed_mac(keyed: Any, message: bytes) -> bytes:
    """The token MAC of ``message``: HMAC-SHA256 under the key of ``keyed``, cut to
    ``_MAC_BYTES``."""
    mac = keyed.copy()
    mac.update(message)
    return mac.digest()[:_MAC_BYTES]


def sign(identity: TaskIdentity, ttl_seconds: int | None = None, now: float | None = None) -> str:
    """Issue a token for ``identity``. Raises ``RuntimeError`` if no secret is configured."""
    if not _ensure_keys():
        raise RuntimeError(
            "otel_taskctx has no signing secret: add 'otel_taskctx' to INSTALLED_APPS with "
            "SECRET_KEY set, or call otel_taskctx.configure_signing(secret)"
        )
    ttl = _keys.ttl if ttl_seconds is None else ttl_seconds
    expires = int((time.time() if now is None else now) + ttl)
    payload: dict[str, object] = {"k": identity.task_key, "x": expires}
    if identity.manager_class_path:
        payload["m"] = identity.manager_class_path
    if identity.root_task_key and identity.root_task_key != identity.task_key:
        payload["r"] = identity.root_task_key
    if identity.parent_task_key:
        payload["p"] = identity.parent_task_key
    if identity.depth:
        payload["d"] = identity.depth
    if identity.bound_to:
        payload["b"] = identity.bound_to
    body = _b64e(json.dumps(payload, separators=(",", ":")).encode("ascii"))
    signed = f"{TOKEN_VERSION}.{body}"
    signer = _keys.signer
    assert signer is not None
    token = f"{signed}.{_b64e(_keyed_mac(signer, signed.encode('ascii')))}"
    if len(token) > MAX_TOKEN_LENGTH:
        raise ValueError(
            f"task identity is {len(token)} characters signed, over the {MAX_TOKEN_LENGTH} limit; "
            "use shorter task keys or manager class paths"
        )
    return token


def _parse_payload(data: object) -> TaskIdentity:
    if not isinstance(data, dict):
        raise InvalidIdentity("payload is not an object")
    try:
        task_key = validate_task_key(data.get("k"))
        manager = validate_class_path(data.get("m"))
        root = data.get("r", task_key)
        if root is not task_key:
            validate_task_key(root)
        parent = data.get("p")
        if parent is not None:
            validate_task_key(parent)
        bound = data.get("b")
        if bound is not None:
            validate_task_key(bound)
    except ValueError as exc:
        raise InvalidIdentity(str(exc)) from None
    depth = data.get("d", 0)
    expires = data.get("x")
    if type(depth) is not int or depth < 0 or depth > 1000:
        raise InvalidIdentity("bad depth")
    if type(expires) is not int:
        raise InvalidIdentity("missing expiry")
    return TaskIdentity(
        task_key=task_key,
        manager_class_path=manager,
        root_task_key=root,
        depth=depth,
        parent_task_key=parent,
        expires_at=float(expires),
        bound_to=bound,
    )


def verify(token: object, now: float | None = None) -> TaskIdentity:
    """Return the identity in ``token`` or raise :class:`InvalidIdentity` saying why."""
    if not isinstance(token, str):
        raise InvalidIdentity(f"token is {type(token).__name__}, not str")
    if len(token) > MAX_TOKEN_LENGTH:
        raise InvalidIdentity(f"token is oversized ({len(token)} characters)")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != TOKEN_VERSION:
        raise InvalidIdentity("not a v1 token")
    if not _ensure_keys():
        raise InvalidIdentity("no signing secret configured")
    signed = f"{parts[0]}.{parts[1]}".encode("ascii", "replace")
    try:
        mac = _b64d(parts[2])
    except (binascii.Error, ValueError):
        raise InvalidIdentity("signature is not base64") from None
    for keyed in _keys.verifiers:
        if hmac.compare_digest(mac, _keyed_mac(keyed, signed)):
            break
    else:
        raise InvalidIdentity("bad signature (forged, tampered or from another deployment)")
    try:
        data = json.loads(_b64d(parts[1]).decode("utf-8"))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise InvalidIdentity("payload is not base64 JSON") from None
    identity = _parse_payload(data)
    if identity.expires_at is not None and identity.expires_at < (
        time.time() if now is None else now
    ):
        raise InvalidIdentity("token expired")
    return identity


# ------------------------------------------------------- verified-token cache (LRU)


class _VerifiedCache:
    """token -> identity (or None for a rejected token), bounded, thread-safe enough."""

    def __init__(self, size: int = 512) -> None:
        self.size = size
        self.data: OrderedDict[str, TaskIdentity | None] = OrderedDict()
        self.lock = Lock()

    def clear(self) -> None:
        with self.lock:
            self.data.clear()

    def get(self, token: str) -> tuple[bool, TaskIdentity | None]:
        try:
            value = self.data[token]
        except KeyError:
            return False, None
        return True, value

    def put(self, token: str, identity: TaskIdentity | None) -> None:
        with self.lock:
            self.data[token] = identity
            if len(self.data) > self.size:
                self.data.popitem(last=False)


_verified_cache = _VerifiedCache()


def verify_cached(token: object) -> TaskIdentity | None:
    """Verify with a per-token cache; a rejected token is logged once at debug level."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
        log.debug("ignoring task identity in baggage: malformed or oversized value")
        return None
    hit, identity = _verified_cache.get(token)
    if hit:
        if identity is not None and identity.expires_at is not None:
            if identity.expires_at < time.time():
                log.debug("ignoring task identity %s: token expired", identity.task_key)
                return None
        return identity
    try:
        identity = verify(token)
    except InvalidIdentity as exc:
        log.debug("ignoring task identity in baggage: %s", exc)
        identity = None
    _verified_cache.put(token, identity)
    return identity
