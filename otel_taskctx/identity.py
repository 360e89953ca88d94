"""The task identity and its token ``v2.<payload>.<signature>``, signed by Django's ``Signer``
(its salt, HMAC and fallback keys; the expiry is in the payload: docs/security.md)."""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from otel_taskctx import semconv

if TYPE_CHECKING:  # Django is imported when a token is signed or verified
    from django.core.signing import Signer

log = logging.getLogger("otel_taskctx.identity")

#: the one baggage entry that carries the identity
BAGGAGE_ENTRY = "taskctx"
#: tokens longer than this are rejected unread (W3C allows 8 KB for the whole header)
MAX_TOKEN_LENGTH = 1024
MAX_TASK_KEY_LENGTH = 200
SIGNING_SALT = "otel_taskctx.identity"
_PREFIX = "v2."
_CLASS_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


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
    #: the ``django.tasks`` result id this identity was issued for (see ``extract_bound``)
    bound_to: str | None = None

    def __post_init__(self) -> None:
        if self.root_task_key is None:
            object.__setattr__(self, "root_task_key", self.task_key)

    def child(self, task_key: str, manager_class_path: str | None = None) -> TaskIdentity:
        """The identity of a task nested inside this one."""
        manager = manager_class_path or self.manager_class_path
        return TaskIdentity(task_key, manager, self.root_task_key, self.depth + 1, self.task_key)

    def lineage_attributes(self) -> dict[str, str | int]:
        """Span attributes describing this task's place in its job tree."""
        attrs = {
            semconv.TASK_KEY: self.task_key,
            semconv.ROOT_TASK_KEY: self.root_task_key,
            semconv.DEPTH: self.depth,
            semconv.PARENT_TASK_KEY: self.parent_task_key,
            semconv.MANAGER_CLASS_PATH: self.manager_class_path,
        }
        return {name: value for name, value in attrs.items() if value is not None}


def validate_task_key(task_key: object) -> str:
    if not isinstance(task_key, str) or not task_key.strip():
        raise ValueError(f"task_key must be a non-empty string, got {task_key!r}")
    if len(task_key) > MAX_TASK_KEY_LENGTH or _CONTROL.search(task_key):
        raise ValueError(
            f"task_key must have at most {MAX_TASK_KEY_LENGTH} characters, none a control one"
        )
    return task_key


def validate_class_path(path: object) -> str | None:
    if path is not None and not (isinstance(path, str) and _CLASS_PATH.fullmatch(path)):
        raise ValueError(f"manager_class_path must be a dotted Python path, got {path!r}")
    return path


#: (signer, ttl in seconds), made from Django's settings on first need
_keys: tuple[Signer, int] | None = None


def configure_signing(
    secret: str | bytes, fallbacks: Iterable[str | bytes] = (), ttl_seconds: int = 24 * 3600
) -> None:
    """Sign with ``secret`` (``fallbacks`` still verify); without it, Django's settings."""
    if not secret:
        raise ValueError("the signing secret must not be empty")
    _configure(secret, [f for f in fallbacks if f], ttl_seconds)


def _configure(key: str | bytes | None, fallbacks: list | None, ttl: int) -> None:
    """Key None: Django's ``SECRET_KEY``; fallbacks None: its ``SECRET_KEY_FALLBACKS``."""
    global _keys
    from django.core.signing import Signer

    signer = Signer(key=key, sep=".", salt=SIGNING_SALT, fallback_keys=fallbacks)  # SHA-256
    _keys = (signer, int(ttl))
    _verified.cache_clear()


def reset_signing() -> None:
    """Forget the keys: they are read from the settings again on next use."""
    global _keys
    _keys = None
    _verified.cache_clear()


def _current_keys() -> tuple[Signer, int] | None:
    if _keys is None:
        from otel_taskctx.conf import get_setting

        try:
            names = ("SIGNING_KEY", "SIGNING_KEY_FALLBACKS", "IDENTITY_TTL")
            _configure(*map(get_setting, names))
        except Exception as exc:  # no Django, settings not configured, no SECRET_KEY
            log.debug("no signing secret available: %s", exc)
    return _keys


def sign(identity: TaskIdentity, ttl_seconds: int | None = None, now: float | None = None) -> str:
    """Issue a token for ``identity``. Raises ``RuntimeError`` if no secret is configured."""
    keys = _current_keys()
    if keys is None:
        raise RuntimeError(
            "otel_taskctx has no signing secret: add 'otel_taskctx' to INSTALLED_APPS with "
            "SECRET_KEY set, or call otel_taskctx.configure_signing(secret)"
        )
    ttl = keys[1] if ttl_seconds is None else ttl_seconds
    root = identity.root_task_key if identity.root_task_key != identity.task_key else None
    optional = {
        "m": identity.manager_class_path,
        "r": root,
        "p": identity.parent_task_key,
        "d": identity.depth,
        "b": identity.bound_to,
    }
    payload = {name: value for name, value in optional.items() if value}
    payload.update(k=identity.task_key, x=int((time.time() if now is None else now) + ttl))
    token = _PREFIX + keys[0].sign_object(payload)
    if len(token) > MAX_TOKEN_LENGTH:
        raise ValueError(f"the signed task identity is over {MAX_TOKEN_LENGTH} characters")
    return token


def verify(token: object, now: float | None = None) -> TaskIdentity:
    """The identity in ``token``, or :class:`InvalidIdentity` saying why; ``now=0`` skips
    the expiry (signature and fields only)."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
        raise InvalidIdentity("malformed or oversized value")
    keys = _current_keys()
    if not token.startswith(_PREFIX) or keys is None:
        raise InvalidIdentity("not a v2 token" if keys else "no signing secret configured")
    from django.core.signing import BadSignature

    try:
        data = keys[0].unsign_object(token[len(_PREFIX) :])
    except (BadSignature, ValueError):
        raise InvalidIdentity("bad signature (forged, tampered, another deployment's)") from None
    if not isinstance(data, dict) or type(data.get("x")) is not int:
        raise InvalidIdentity("payload is not an object with an expiry")
    depth = data.get("d", 0)
    if type(depth) is not int or not 0 <= depth <= 1000:
        raise InvalidIdentity("bad depth")
    try:
        for name in "rpb":
            if data.get(name) is not None:
                validate_task_key(data[name])
        key, manager = validate_task_key(data.get("k")), validate_class_path(data.get("m"))
    except ValueError as exc:
        raise InvalidIdentity(str(exc)) from None
    if data["x"] < (time.time() if now is None else now):
        raise InvalidIdentity("token expired")
    return TaskIdentity(
        key, manager, data.get("r"), depth, data.get("p"), float(data["x"]), data.get("b")
    )


@functools.lru_cache(maxsize=512)
def _verified(token: str) -> TaskIdentity | str:
    """The identity in ``token`` whatever its expiry, or why it does not verify."""
    try:
        return verify(token, now=0)
    except InvalidIdentity as exc:
        return str(exc)


def verify_cached(token: object) -> TaskIdentity | None:
    """:func:`verify`, memoised per token; None (and a DEBUG line saying why) if it fails."""
    result = _verified(token) if isinstance(token, str) else "not a string"
    if isinstance(result, TaskIdentity) and result.expires_at < time.time():
        result = "token expired"
    if isinstance(result, str):
        log.debug("ignoring task identity in baggage: %s", result)
        return None
    return result
