"""Progress: report a task's progress to powercrud, throttled per task.

:func:`report_progress` is the call for code that runs inside a task; :func:`report_for`
does the same for a given identity (the span processor). Messages go to the task's powercrud
manager (``update_progress``), at most one write every
``OTEL_TASKCTX["PROGRESS_MIN_INTERVAL"]`` seconds per task; the newest message always lands.

A fraction travels in the message: powercrud stores a task's progress as one string
(``AsyncManager.update_progress`` rejects anything else) and its progress endpoint returns
that string; its modal draws a bar for a running job but never sets its width. So
``report_progress(message, done=n, total=N)`` stores ``"<message> (NN%)"``, readable as it is
on the dashboard and in logs, and the script ``otel_taskctx/powercrud_progress.html``
(include it once in the site's base template) fills powercrud's bar from it.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from typing import Any

from opentelemetry import trace

from otel_taskctx import semconv
from otel_taskctx.context import current_task, start_detached
from otel_taskctx.descendants import log_outside_task, resolve_manager
from otel_taskctx.identity import TaskIdentity

log = logging.getLogger("otel_taskctx")


def report_progress(message: str, done: int | None = None, total: int | None = None) -> bool:
    """Store ``message`` as the current task's progress; False (no-op) outside a task.

    With ``done`` of ``total`` the stored text ends in ``(NN%)``, which powercrud's progress bar
    shows (:func:`progress_text`).

    Throttled per task to one write every ``OTEL_TASKCTX["PROGRESS_MIN_INTERVAL"]`` seconds
    (0.25): a message arriving sooner is held and written when the interval is up (by a
    background thread if nothing else is reported meanwhile), replaced by any newer one. So
    the newest message always lands, and :func:`flush_progress` (called by the worker
    instrumentation when the job ends) writes a held message at once. Outside a task it
    returns False and logs that at DEBUG once per call site.
    """
    text = progress_text(message, done, total)
    identity = current_task()
    if identity is None:
        log_outside_task("report_progress", "the message was not stored")
        return False
    report_for(identity, text)
    span = trace.get_current_span()
    if span.is_recording():
        span.add_event(
            semconv.PROGRESS_EVENT,
            {semconv.PROGRESS_MESSAGE: text, semconv.FORWARDED: True},
        )
    return True


#: a progress message ending in "(NN%)" is NN percent done
PERCENT = re.compile(r"\((\d{1,3})%\)\s*$")


def progress_text(message: object, done: int | None = None, total: int | None = None) -> str:
    """``message``, with ``" (NN%)"`` appended when ``done`` of ``total`` is given.

    The percentage is rounded down (100% only when ``done == total``). ``done`` and ``total``
    come together, ``total >= 1`` and ``0 <= done <= total``; anything else is a ``ValueError``.
    """
    text = str(message)
    if done is None and total is None:
        return text
    if done is None or total is None:
        raise ValueError("report_progress: give both done= and total=, or neither")
    if isinstance(done, bool) or isinstance(total, bool):
        raise ValueError("report_progress: done and total are counts, not booleans")
    done, total = int(done), int(total)
    if total < 1 or not 0 <= done <= total:
        raise ValueError(
            f"report_progress: need 0 <= done <= total and total >= 1, got {done}/{total}"
        )
    return f"{text} ({done * 100 // total}%)"


def percent(text: str) -> int | None:
    """The percentage a progress message ends with, or None."""
    match = PERCENT.search(text)
    return min(100, int(match.group(1))) if match else None


def report_for(identity: TaskIdentity, message: str) -> None:
    """Report ``message`` for ``identity``'s task through the throttle (no span event)."""
    from otel_taskctx.conf import get_setting

    interval = float(get_setting("PROGRESS_MIN_INTERVAL") or 0)
    _throttle.submit(identity, str(message), interval)


def flush_progress(task_key: str) -> bool:
    """Write the task's held-back progress message now; forget the task's throttle state.

    The worker instrumentation calls this when a job ends (before powercrud's completion
    hook), so the last message before the end is never lost. True if a message was written.
    """
    return _throttle.flush(task_key)


def flush_all_progress() -> int:
    """Write every held-back progress message now (e.g. at shutdown). Returns the count."""
    return _throttle.flush_all()


class _TaskProgress:
    __slots__ = ("identity", "interval", "next_write", "pending", "seq", "written", "write_lock")

    def __init__(self, identity: TaskIdentity, interval: float) -> None:
        self.identity = identity
        self.interval = interval
        self.next_write = 0.0  # monotonic time from which a write may happen
        self.pending: tuple[int, str, TaskIdentity] | None = None
        self.seq = 0
        self.written = 0
        self.write_lock = threading.Lock()


class _ProgressThrottle:
    """Per-task progress throttle with one daemon thread for held-back messages."""

    #: forget a task's state this long after its last write (no flush ever came)
    idle_ttl = 600.0

    def __init__(self) -> None:
        self._init()

    def _init(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._tasks: dict[str, _TaskProgress] = {}
        self._thread: threading.Thread | None = None

    def submit(self, identity: TaskIdentity, message: str, interval: float) -> None:
        key = identity.task_key
        if interval <= 0:
            with self._cond:
                known = key in self._tasks
            if not known:  # unthrottled: write through
                resolve_manager(identity).update_progress(key, message)
                return
        now = time.monotonic()
        with self._cond:
            state = self._tasks.get(key)
            if state is None:
                state = self._tasks[key] = _TaskProgress(identity, interval)
            state.interval = interval
            state.seq += 1
            seq = state.seq
            if now >= state.next_write:
                state.next_write = now + interval
                state.pending = None
                write_now = True
            else:
                state.pending = (seq, message, identity)
                write_now = False
                self._ensure_thread()
                self._cond.notify()
        if write_now and not self._write(
            state, seq, message, identity, raise_errors=True, blocking=False
        ):
            with self._cond:  # the background thread is writing: it takes this one next
                if state.written < seq and (state.pending is None or state.pending[0] < seq):
                    state.pending = (seq, message, identity)
                    self._ensure_thread()
                    self._cond.notify()

    def _write(
        self,
        state: _TaskProgress,
        seq: int,
        message: str,
        identity: TaskIdentity,
        raise_errors: bool = False,
        blocking: bool = True,
    ) -> bool:
        # The job's own thread never waits for the background writer: that writer may be
        # blocked on a row or database lock the job holds in its transaction (deadlock).
        if not state.write_lock.acquire(blocking=blocking):
            return False
        try:
            return self._write_locked(state, seq, message, identity, raise_errors)
        finally:
            state.write_lock.release()

    def _write_locked(
        self,
        state: _TaskProgress,
        seq: int,
        message: str,
        identity: TaskIdentity,
        raise_errors: bool,
    ) -> bool:
        if seq <= state.written:
            return False  # a newer message already landed
        state.written = seq
        try:
            manager = resolve_manager(identity)
            if not raise_errors and not _progress_key_exists(manager, identity.task_key):
                # a held message after the job ended (the completion hook deleted the
                # key): writing it would leave a stale key behind
                return False
            manager.update_progress(identity.task_key, message)
        except Exception:
            if raise_errors:
                raise
            log.warning("could not write progress of task %s", identity.task_key, exc_info=True)
            return False
        return True

    def flush(self, task_key: str) -> bool:
        """Write the held message now (unless the task's progress key is gone already)."""
        with self._cond:
            state = self._tasks.pop(task_key, None)
            pending = state.pending if state is not None else None
            if state is not None:
                state.pending = None
        if state is None:
            return False
        if pending is None:
            with state.write_lock:  # a write the background thread has started ends first
                return False
        return self._write(state, *pending)

    def flush_all(self) -> int:
        with self._cond:
            keys = [k for k, s in self._tasks.items() if s.pending is not None]
        return sum(1 for k in keys if self.flush(k))

    def _ensure_thread(self) -> None:  # called with the condition held
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._run, name="otel-taskctx-progress", daemon=True
            )
            start_detached(self._thread)

    def _run(self) -> None:
        idle = True
        while True:
            due: list[tuple[_TaskProgress, tuple[int, str, TaskIdentity]]] = []
            with self._cond:
                now = time.monotonic()
                wait: float | None = None
                for key, state in list(self._tasks.items()):
                    if state.pending is None:
                        if now - state.next_write > self.idle_ttl:
                            del self._tasks[key]
                        continue
                    if now >= state.next_write:
                        due.append((state, state.pending))
                        state.pending = None
                        state.next_write = now + state.interval
                    else:
                        left = state.next_write - now
                        wait = left if wait is None else min(wait, left)
                if not due and (wait is not None or idle):
                    self._cond.wait(timeout=wait if wait is not None else 60.0)
                    continue
            for state, pending in due:
                self._write(state, *pending)
            idle = not due
            if idle:  # nothing held any more: give back this thread's database connections
                _close_thread_connections()


def _progress_key_exists(manager: Any, task_key: str) -> bool:
    prefix = getattr(manager, "progress_prefix", "powercrud:async:progress:")
    return bool(manager.cache.has_key(f"{prefix}{task_key}"))


def _close_thread_connections() -> None:
    try:
        from django.db import connections

        connections.close_all()
    except Exception:  # pragma: no cover - Django not configured
        pass


_throttle = _ProgressThrottle()
if hasattr(os, "register_at_fork"):  # a forked worker starts with a fresh throttle
    os.register_at_fork(after_in_child=_throttle._init)
