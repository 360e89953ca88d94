"""A task's progress message to its manager: one write per ``PROGRESS_MIN_INTERVAL`` per task;
a message arriving sooner is held (the newest wins) and written by a timer or at the job's end,
unless the job wrote the key itself meanwhile (powercrud's "completed update": it stays last)."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

from opentelemetry import trace

from otel_taskctx import semconv
from otel_taskctx.context import current_task, start_detached
from otel_taskctx.descendants import log_outside_task, resolve_manager
from otel_taskctx.identity import TaskIdentity

log = logging.getLogger("otel_taskctx")


def report_progress(message: str, done: int | None = None, total: int | None = None) -> bool:
    """Store ``message`` (ending in ``(NN%)`` with ``done`` of ``total``) as the current task's
    progress; False outside a task."""
    text = progress_text(message, done, total)
    identity = current_task()
    if identity is None:
        log_outside_task("report_progress", "the message was not stored")
        return False
    report_for(identity, text)
    span = trace.get_current_span()
    if span.is_recording():
        attributes = {semconv.PROGRESS_MESSAGE: text, semconv.FORWARDED: True}
        span.add_event(semconv.PROGRESS_EVENT, attributes)
    return True


def progress_text(message: object, done: int | None = None, total: int | None = None) -> str:
    """``message``, with ``" (NN%)"`` (rounded down) when ``done`` of ``total`` is given."""
    if done is None and total is None:
        return str(message)
    if done is None or total is None or isinstance(done, bool) or isinstance(total, bool):
        raise ValueError("report_progress: done and total are two counts, given together")
    done, total = int(done), int(total)
    if total < 1 or not 0 <= done <= total:
        raise ValueError(f"report_progress: need 0 <= done <= total, total >= 1: {done}/{total}")
    return f"{message} ({done * 100 // total}%)"


@dataclass(slots=True)
class _Task:
    """One task's throttle: when it may write next, the message held, the timer writing it."""

    identity: TaskIdentity
    interval: float = 0.0
    due: float = 0.0  # monotonic time from which the job's thread may write itself
    held: str | None = None
    written: str | None = None  # the last message this throttle wrote
    timer: threading.Timer | None = None


#: forget a task's throttle this long after its last write (no flush came)
IDLE_SECONDS = 600.0
_lock = threading.Lock()
_tasks: dict[str, _Task] = {}


def report_for(identity: TaskIdentity, message: str) -> None:
    """Report ``message`` for ``identity``'s task through the throttle (no span event)."""
    from otel_taskctx.conf import get_setting

    interval = float(get_setting("PROGRESS_MIN_INTERVAL") or 0)
    key, now = identity.task_key, time.monotonic()
    with _lock:
        task = _tasks.get(key)
        if task is None:
            for other, idle in list(_tasks.items()):  # tasks no flush came for
                if idle.timer is None and now - idle.due > IDLE_SECONDS:
                    del _tasks[other]
            task = _tasks[key] = _Task(identity)
        task.identity, task.interval = identity, interval
        write_now = task.timer is None and now >= task.due
        if write_now:
            task.due, task.written = now + interval, str(message)
        else:  # while a timer is set only it writes: no older message lands last
            task.held = str(message)
            if task.timer is None:
                _start_timer(task, task.due - now)
    if write_now:
        resolve_manager(identity).update_progress(key, str(message))


def _start_timer(task: _Task, delay: float) -> None:  # called with the lock held
    task.timer = threading.Timer(delay, _write_held, (task,))
    task.timer.name = "otel-taskctx-progress"
    task.timer.daemon = True
    start_detached(task.timer)


def _write_held(task: _Task) -> None:
    """The timer: write the held message, and again after the interval if a newer came."""
    with _lock:
        message, task.held = task.held, None
    written = message is not None and _write(task, message)
    with _lock:
        if written:
            task.due = time.monotonic() + task.interval
        task.timer = None
        if task.held is not None:
            _start_timer(task, task.interval)
    from django.db import connections

    connections.close_all()  # this thread ends: its database connections with it


def _write(task: _Task, message: str) -> bool:
    """Write a held message, unless the progress key changed since this throttle's last write:
    deleted by the job's end, or written by the job's own code (powercrud's "updating: i/n" or
    its final "completed update"), which is newer than the held message or may be."""
    key = task.identity.task_key
    try:
        manager = resolve_manager(task.identity)
        if manager.get_progress(key) != task.written:
            return False
        manager.update_progress(key, message)
    except Exception:
        log.warning("could not write progress of task %s", key, exc_info=True)
        return False
    task.written = message
    return True


def flush_progress(task_key: str) -> bool:
    """Write the task's held message now and forget its throttle (the worker calls this
    when the job ends). True if a message was written."""
    with _lock:
        task = _tasks.pop(task_key, None)
        if task is None:
            return False
        message, task.held, timer = task.held, None, task.timer
    if timer is not None:
        timer.cancel()
        if timer.is_alive() and timer is not threading.current_thread():
            timer.join()  # a write it started ends first
    return message is not None and _write(task, message)


def flush_all_progress() -> int:
    """Write every held message now (e.g. at shutdown). Returns the count."""
    held = [key for key, task in list(_tasks.items()) if task.held is not None]
    return sum(flush_progress(key) for key in held)


def _reset() -> None:
    global _lock, _tasks
    _lock, _tasks = threading.Lock(), {}


if hasattr(os, "register_at_fork"):  # a forked worker starts with no throttle
    os.register_at_fork(after_in_child=_reset)
