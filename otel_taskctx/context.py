"""The task context: "am I inside an async job, and which one?" (OpenTelemetry API only).

The identity lives in the current OpenTelemetry :class:`~opentelemetry.context.Context` as
one signed baggage entry, so it follows the context wherever OpenTelemetry carries it: into
threads and asyncio tasks through ``contextvars``, and across the broker through
:func:`otel_taskctx.inject` / :func:`otel_taskctx.extract`.

Reading it is cheap: the context also caches the verified :class:`TaskIdentity` next to the
baggage mapping it was verified for, so ``skip_nested_async()`` in every ``save()`` costs
two dictionary look-ups once the identity has been verified.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from opentelemetry import baggage, context

from otel_taskctx.identity import (
    BAGGAGE_ENTRY,
    TaskIdentity,
    key_change_listeners,
    sign,
    validate_class_path,
    validate_task_key,
    verify_cached,
)

log = logging.getLogger("otel_taskctx")

F = TypeVar("F", bound=Callable[..., Any])

#: Context key holding ``(token, TaskIdentity)`` for a token this process verified or issued.
_VERIFIED_KEY = context.create_key("otel_taskctx.verified-identity")
#: Context key set by :func:`allow_nested_async`.
_ALLOW_NESTED_KEY = context.create_key("otel_taskctx.allow-nested-async")


def _token_in(ctx: context.Context) -> object | None:
    return baggage.get_baggage(BAGGAGE_ENTRY, ctx)


def _verified(ctx: context.Context) -> tuple[TaskIdentity | None, bool]:
    """``(identity, memoisable)``: an identity verified into the context (or none at all) may
    be memoised; one verified from a raw token is checked again (its expiry) on every call."""
    token = _token_in(ctx)
    if token is None:
        return None, True
    cached = ctx.get(_VERIFIED_KEY)
    if cached is not None and cached[0] is token:
        return cached[1], True
    identity = verify_cached(token)
    return identity, identity is None or identity.expires_at is None


def identity_from_context(ctx: context.Context | None = None) -> TaskIdentity | None:
    """The verified identity in ``ctx`` (default: the current context), or None."""
    return _verified(context.get_current() if ctx is None else ctx)[0]


# The last context looked at and its identity. Contexts are immutable, and holding a strong
# reference keeps the object alive, so ``is`` on it can never match a different context.
_last: tuple[object, TaskIdentity | None] = (None, None)


def _lookup(ctx: context.Context) -> TaskIdentity | None:
    global _last
    identity, memoisable = _verified(ctx)
    if memoisable:
        _last = (ctx, identity)
    return identity


def _forget() -> None:
    global _last
    _last = (None, None)


key_change_listeners.append(_forget)


def current_task() -> TaskIdentity | None:
    """The task this code runs in, or None. Never raises, whatever the baggage holds."""
    ctx = context.get_current()
    last = _last
    if last[0] is ctx:
        return last[1]
    return _lookup(ctx)


def skip_nested_async() -> bool:
    """True inside a task: nested work should run inline instead of launching a job."""
    ctx = context.get_current()
    last = _last
    if last[0] is ctx:
        return last[1] is not None
    return _lookup(ctx) is not None


def context_with_identity(
    identity: TaskIdentity, token: str | None = None, ctx: context.Context | None = None
) -> context.Context:
    """A copy of ``ctx`` carrying ``identity`` (signed now unless ``token`` is given)."""
    if token is None:
        token = sign(identity)
    ctx = baggage.set_baggage(BAGGAGE_ENTRY, token, context=ctx)
    return context.set_value(_VERIFIED_KEY, (token, identity), ctx)


def context_without_identity(ctx: context.Context | None = None) -> context.Context:
    """A copy of ``ctx`` with no task identity (the user's other baggage is kept)."""
    if ctx is None:
        ctx = context.get_current()
    if baggage.get_baggage(BAGGAGE_ENTRY, ctx) is not None:
        ctx = baggage.remove_baggage(BAGGAGE_ENTRY, ctx)
    if ctx.get(_VERIFIED_KEY) is not None:
        ctx = context.set_value(_VERIFIED_KEY, None, ctx)
    return ctx


def remember_verified(ctx: context.Context) -> context.Context:
    """Verify the identity in ``ctx`` once and keep the result in the context.

    Unverifiable identity is removed, so code reading raw baggage never sees a forged entry.
    """
    token = _token_in(ctx)
    if token is None:
        return ctx
    identity = verify_cached(token)
    if identity is None:
        return context_without_identity(ctx)
    return context.set_value(_VERIFIED_KEY, (token, identity), ctx)


class task_context:  # noqa: N801 - used like contextlib's context managers
    """Run a block (or, as a decorator, a function) inside the task ``task_key``.

    The identity goes into the current OpenTelemetry context as signed baggage and the
    previous context is restored on exit, also when the body raises. Inside another task the
    new identity records the outer task as parent, its root task key and depth + 1.
    """

    __slots__ = ("task_key", "manager_class_path", "_tokens")

    def __init__(self, task_key: str, manager_class_path: str | None = None) -> None:
        self.task_key = validate_task_key(task_key)
        self.manager_class_path = validate_class_path(manager_class_path)
        self._tokens: list[object] = []

    def _identity(self) -> TaskIdentity:
        outer = current_task()
        if outer is None:
            return TaskIdentity(self.task_key, self.manager_class_path)
        return outer.child(self.task_key, self.manager_class_path)

    def __enter__(self) -> TaskIdentity:
        identity = self._identity()
        self._tokens.append(context.attach(context_with_identity(identity)))
        return identity

    def __exit__(self, *exc_info: object) -> None:
        context.detach(self._tokens.pop())

    def __call__(self, func: F) -> F:
        task_key, manager = self.task_key, self.manager_class_path

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with task_context(task_key, manager):
                return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]


@contextmanager
def attached(ctx: context.Context) -> Iterator[context.Context]:
    """Attach ``ctx`` for the block and detach it afterwards, also on error."""
    token = context.attach(ctx)
    try:
        yield ctx
    finally:
        context.detach(token)


def start_detached(thread: threading.Thread) -> threading.Thread:
    """Start one of the library's own long-lived threads (span writer, progress, lock
    refresher) with an empty context. Threads inherit the context they are started in where
    threading is instrumented (see ``_threads`` in the instrumentation): started lazily inside
    a job, such a thread would otherwise run as that job for the rest of the process, and a
    span it caused (a host's database or Redis instrumentation) would join that job's trace."""
    token = context.attach(context.Context())
    try:
        thread.start()
    finally:
        context.detach(token)
    return thread


@contextmanager
def allow_nested_async() -> Iterator[None]:
    """Inside this block, nested launches are enqueued as separate jobs again.

    Such detached jobs keep the trace context (the trace shows the link) but do not run under
    the parent's identity.
    """
    token = context.attach(context.set_value(_ALLOW_NESTED_KEY, True))
    try:
        yield
    finally:
        context.detach(token)


def nested_async_allowed(ctx: context.Context | None = None) -> bool:
    return bool(context.get_value(_ALLOW_NESTED_KEY, ctx))
