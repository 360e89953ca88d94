"""The current task: its identity in the OpenTelemetry context (OpenTelemetry API only).

One signed baggage entry, so it follows the context into threads, asyncio tasks and (through
``inject`` / ``extract``) workers; the identity verified for it is kept beside it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

from opentelemetry import baggage, context

from otel_taskctx.identity import (
    BAGGAGE_ENTRY,
    TaskIdentity,
    sign,
    validate_class_path,
    validate_task_key,
    verify_cached,
)

#: ``(token, TaskIdentity)`` for the token this process verified or issued
_VERIFIED_KEY = context.create_key("otel_taskctx.verified-identity")
_ALLOW_NESTED_KEY = context.create_key("otel_taskctx.allow-nested-async")

# The last context read and its identity: ``skip_nested_async()`` runs in every ``save()``.
# Holding the context keeps it alive, so ``is`` can never match another one.
_last: tuple[object, TaskIdentity | None] = (None, None)


def identity_from_context(ctx: context.Context | None = None) -> TaskIdentity | None:
    """The verified identity in ``ctx`` (default: the current context), or None."""
    global _last
    ctx = context.get_current() if ctx is None else ctx
    last = _last
    if last[0] is ctx:
        return last[1]
    token = baggage.get_baggage(BAGGAGE_ENTRY, ctx)
    verified = ctx.get(_VERIFIED_KEY)
    if token is not None and (verified is None or verified[0] is not token):
        return verify_cached(token)  # a raw token: its expiry is checked on every call
    identity = None if token is None else verified[1]
    _last = (ctx, identity)
    return identity


def current_task() -> TaskIdentity | None:
    """The task this code runs in, or None. Never raises, whatever the baggage holds."""
    return identity_from_context()


def skip_nested_async() -> bool:
    """True inside a task: nested work should run inline instead of launching a job."""
    return identity_from_context() is not None


def context_with_identity(
    identity: TaskIdentity, token: str | None = None, ctx: context.Context | None = None
) -> context.Context:
    """A copy of ``ctx`` carrying ``identity`` (signed now unless ``token`` is given)."""
    token = sign(identity) if token is None else token
    ctx = baggage.set_baggage(BAGGAGE_ENTRY, token, context=ctx)
    return context.set_value(_VERIFIED_KEY, (token, identity), ctx)


def context_without_identity(ctx: context.Context | None = None) -> context.Context:
    """A copy of ``ctx`` with no task identity (the user's other baggage is kept)."""
    ctx = baggage.remove_baggage(BAGGAGE_ENTRY, ctx)
    return context.set_value(_VERIFIED_KEY, None, ctx)


def task_context(
    task_key: str, manager_class_path: str | None = None
) -> AbstractContextManager[TaskIdentity]:
    """Run a block (or, as a decorator, a function) inside the task ``task_key``, nested in
    the current task if any. Bad arguments raise ``ValueError`` here."""
    return _task_context(validate_task_key(task_key), validate_class_path(manager_class_path))


@contextmanager
def _task_context(task_key: str, manager_class_path: str | None) -> Iterator[TaskIdentity]:
    outer = current_task()
    if outer is None:
        identity = TaskIdentity(task_key, manager_class_path)
    else:
        identity = outer.child(task_key, manager_class_path)
    with attached(context_with_identity(identity)):
        yield identity


@contextmanager
def attached(ctx: context.Context) -> Iterator[context.Context]:
    """Attach ``ctx`` for the block and detach it afterwards, also on error."""
    token = context.attach(ctx)
    try:
        yield ctx
    finally:
        context.detach(token)


def start_detached(thread: threading.Thread) -> threading.Thread:
    """Start one of the library's own threads with an empty context: started inside a job
    where threading is instrumented, it would otherwise run as that job for good."""
    with attached(context.Context()):
        thread.start()
    return thread


def allow_nested_async() -> AbstractContextManager[context.Context]:
    """Inside this block nested launches are enqueued as separate jobs again (detached jobs:
    they keep the trace context, not the parent's identity)."""
    return attached(context.set_value(_ALLOW_NESTED_KEY, True))


def nested_async_allowed(ctx: context.Context | None = None) -> bool:
    return bool(context.get_value(_ALLOW_NESTED_KEY, ctx))
