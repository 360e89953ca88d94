"""Signed task identity: what travels in baggage and how it is verified.

The identity is one compact baggage entry (``taskctx``) whose value is a token::

    v2.<base64url(json payload)>.<base64url(hmac-sha256)>

signed and verified by Django's own :class:`django.core.signing.Signer` (separator ``.``,
salt ``otel_taskctx.identity``, SHA-256) under ``OTEL_TASKCTX["SIGNING_KEY"]`` or Django's
``SECRET_KEY``, and verified under the fallback keys too (key rotation). So a ``baggage``
header sent by any HTTP client cannot claim to be a task.

The payload holds the task key, manager class path, parent and root task keys, the nesting
depth, an expiry (unix seconds) and, for a queued ``django.tasks`` task, the id of the task it
was issued for (``bound_to``). The secret is provided by :func:`configure_signing` (the Django
app calls it from ``ready()``); if nobody configured it, the first use reads Django's settings
lazily.
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from threading import Lock
from typing import TYPE_CHECKING

from otel_taskctx import semconv

if TYPE_CHECKING:  # Django is imported when a key is configured, not with this module
    from django.core import signing

log = logging.getLogger("otel_taskctx.identity")

#: The single baggage entry that carries the identity.
BAGGAGE_ENTRY = "taskctx"
TOKEN_VERSION = "v2"
#: Tokens longer than this are rejected unread (W3C allows 8 KB for the whole header).
MAX_TOKEN_LENGTH = 1024
MAX_TASK_KEY_LENGTH = 200
DEFAULT_TTL_SECONDS = 24 * 3600
#: the salt of Django's signer: keeps these signatures apart from every other use of the key
SIGNING_SALT = "otel_taskctx.identity"
_PREFIX = f"{TOKEN_VERSION}."
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
        #: Django's signer under the current key, verifying under the fallback keys too
        self.signer: signing.Signer | None = None
        self.ttl = DEFAULT_TTL_SECONDS
        self.provider: Callable[[], tuple[str | bytes, Iterable[str | bytes], int]] | None = None


_keys = _Keys()
#: called (without arguments) whenever the keys change, to drop memoised verifications
key_change_listeners: list[Callable[[], None]] = []


def _keys_changed() -> None:
    _verified_cache.clear()
    for listener in key_change_listeners:
        listener()


def configure_signing(
    secret: str | bytes,
    fallbacks: Iterable[str | bytes] = (),
    ttl_seconds: int = DEFAULT_TTL_SECONDS,
) -> None:
    """Set the secret that signs identities (``fallbacks`` still verify, for key rotation)."""
    if not secret:
        raise ValueError("the signing secret must not be empty")
    from django.core import signing

    signer = signing.Signer(
        key=secret,
        sep=".",
        salt=SIGNING_SALT,
        algorithm="sha256",
        fallback_keys=[f for f in fallbacks if f],
    )
    with _keys.lock:
        _keys.signer = signer
        _keys.ttl = int(ttl_seconds)
    _keys_changed()


def set_key_provider(
    provider: Callable[[], tuple[str | bytes, Iterable[str | bytes], int]] | None,
) -> None:
    """Register a callable returning ``(secret, fallbacks, ttl)``, used on first need."""
    _keys.provider = provider


def reset_signing() -> None:
    """Forget the configured secret (tests; the provider is asked again on next use)."""
    with _keys.lock:
        _keys.signer = None
    _keys_changed()


def _django_provider() -> tuple[str | bytes, Iterable[str | bytes], int]:
    from otel_taskctx.conf import signing_settings  # lazy: Django-facing

    return signing_settings()


def _ensure_keys() -> signing.Signer | None:
    if _keys.signer is not None:
        return _keys.signer
    provider = _keys.provider or _django_provider
    try:
        secret, fallbacks, ttl = provider()
    except Exception as exc:  # no Django, settings not configured, ...
        log.debug("no signing secret available: %s", exc)
        return None
    if not secret:
        return None
    configure_signing(secret, fallbacks, ttl)
    return _keys.signer


# --------------------------------------------------------------------------- tokens


def sign(identity: TaskIdentity, ttl_seconds: int | None = None, now: float | None = None) -> str:
    """Issue a token for ``identity``. Raises ``RuntimeError`` if no secret is configured."""
    signer = _ensure_keys()
    if signer is None:
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
    token = _PREFIX + signer.sign_object(payload)
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
    if not token.startswith(_PREFIX) or token.count(".") != 2:
        raise InvalidIdentity(f"not a {TOKEN_VERSION} token")
    signer = _ensure_keys()
    if signer is None:
        raise InvalidIdentity("no signing secret configured")
    from django.core.signing import BadSignature

    try:
        data = signer.unsign_object(token[len(_PREFIX) :])
    except BadSignature:
        raise InvalidIdentity(
            "bad signature (forged, tampered or from another deployment)"
        ) from None
    except Exception:  # signed by us, yet unreadable: never issued by this version
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
