"""A worker's run of one task, the same for every queue (django-q2's ``pre_execute`` /
``post_execute_in_worker``, ``django.tasks``' ``task_started`` / ``task_finished``).

:func:`start` attaches the run's context (its CONSUMER span and the verified identity) and,
for a worker's run of a job, keeps the job's locks alive (``LOCK_TTL`` /
``LOCK_REFRESH_INTERVAL``) while it runs. :meth:`Run.finish` (before the queue reports the
outcome) writes the last held progress and stops the refresher; :meth:`Run.close` detaches
the context and ends the span. Each queue keeps its runs in a registry of its own, by the key
its two signals share, in a subclass that adds what only it needs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from opentelemetry import context, trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.taskctx import utils

from otel_taskctx.identity import TaskIdentity

log = logging.getLogger("otel_taskctx.instrumentation")


@dataclass
class Run:
    span: trace.Span
    token: object
    identity: TaskIdentity | None
    #: the refresher of the job's locks (None: not refreshed here)
    lock_keeper: Any = None

    def finish(self) -> None:
        """The run's work is over: its last progress written, its lock refresher stopped.
        Called once, before the queue reports the outcome."""
        if self.identity is None:
            return
        try:
            from otel_taskctx.progress import flush_progress

            flush_progress(self.identity.task_key)
        except Exception:
            log.exception("could not write the last progress of task %s", self.identity.task_key)
        if self.lock_keeper is not None:
            try:
                self.lock_keeper.stop()
            except Exception:
                log.debug("could not stop the lock refresher", exc_info=True)
            self.lock_keeper = None

    def close(self) -> None:
        """Leave the run's context and end its span."""
        try:
            context.detach(self.token)
        except Exception:  # detached elsewhere (a run that never got its end signal)
            log.debug("could not detach the context of a run", exc_info=True)
        finally:
            self.span.end()
            if self.identity is not None:
                utils.nested_counters.forget(self.identity.task_key)


def keep_locks_alive(identity: TaskIdentity) -> Any:
    """Refresh the TTL of the job's locks while it runs (they expire if the worker dies);
    returns the keeper to stop, or None (also on a cache whose locks cannot be kept, where
    powercrud's locks keep powercrud's own TTL: see
    :func:`otel_taskctx.powercrud_cache.steps_aside`)."""
    from otel_taskctx.conflicts.keepalive import start_keeping_locks_alive
    from otel_taskctx.descendants import resolve_manager
    from otel_taskctx.powercrud_cache import steps_aside

    manager = resolve_manager(identity)
    if steps_aside(manager):
        return None
    return start_keeping_locks_alive(identity.task_key, manager)


def start[R: Run](
    run_class: type[R],
    span: trace.Span,
    ctx: Context,
    identity: TaskIdentity | None,
    keep_locks: bool,
    **extra: Any,
) -> R:
    """Attach ``span`` in ``ctx`` for the run; refresh the job's locks if ``keep_locks``."""
    token = context.attach(trace.set_span_in_context(span, ctx))
    keeper = None
    if identity is not None and keep_locks:
        try:
            keeper = keep_locks_alive(identity)
        except Exception:
            log.exception("could not start refreshing the locks of %s", identity.task_key)
    return run_class(span, token, identity, keeper, **extra)
