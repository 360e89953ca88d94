"""Keeping a running job's locks alive: a background thread refreshes their TTLs.

Locks carry a TTL (``OTEL_TASKCTX["LOCK_TTL"]``, default powercrud's ``CONFLICT_TTL``) so
that a worker that dies does not leave objects locked forever. A job that runs longer than
the TTL would lose its locks under it, so the worker wraps the job in
:func:`keep_locks_alive`, which refreshes every lock the task still holds every
``interval`` seconds and stops when the block ends. If the process dies, the refresher dies
with it and the locks expire one TTL later.

One refresher thread per process serves every running block (a django-q2 worker runs one
job at a time; a threaded caller may run several): entering a block only registers the task,
so a short job costs no thread start. Refreshes of different tasks run one after another on
that thread.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from otel_taskctx.context import start_detached

log = logging.getLogger("otel_taskctx.conflicts")

#: the refresher closes its database connections when nothing is due within this many seconds
IDLE_CLOSE_AFTER = 1.0
#: stopped entries the schedule keeps (beyond twice the running ones) before compacting
COMPACT_AFTER = 1024


class LockKeeper:
    """One task's lock refreshing, run by the process's refresher thread.

    Usable directly (``start()`` / ``stop()``) or through :func:`keep_locks_alive`.
    """

    def __init__(self, task_key: str, manager: Any, interval: float, ttl: int | None = None):
        self.task_key = task_key
        self.manager = manager
        self.interval = float(interval)
        self.ttl = ttl
        self.refreshes = 0  #: completed refresh rounds
        self.refreshed = 0  #: locks refreshed by the last round
        self.last_error: BaseException | None = None
        self._active = False
        self._due = 0.0

    def refresh_now(self) -> int:
        """Refresh once, in the calling thread. Returns the number of locks refreshed."""
        from otel_taskctx.conflicts import get_conflict_store

        store = get_conflict_store(self.manager)
        count = store.refresh(self.task_key, self.ttl)
        self.refreshed = count
        self.refreshes += 1
        return count

    def _round(self) -> None:
        try:
            self.refresh_now()
        except Exception as exc:  # keep trying: the next round may succeed
            self.last_error = exc
            log.warning("could not refresh the locks of task %s: %s", self.task_key, exc)

    def start(self) -> LockKeeper:
        """Refresh every ``interval`` seconds from now on (first round one interval away)."""
        _refresher().add(self)
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """No refresh after this returns (a round in progress is waited for)."""
        _refresher().remove(self, timeout)

    def is_alive(self) -> bool:
        """True between ``start()`` and ``stop()``."""
        return self._active


class _Refresher:
    """The process's refresher thread and its schedule (a heap of due keepers)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, LockKeeper]] = []
        self._seq = itertools.count()
        self._active = 0
        self._current: LockKeeper | None = None
        self._thread: threading.Thread | None = None
        self.wakeups = 0  #: times an ``add`` woke the sleeping thread

    def add(self, keeper: LockKeeper) -> None:
        with self._cond:
            if keeper._active:
                return
            keeper._active = True
            self._active += 1
            due = time.monotonic() + keeper.interval
            # the thread sleeps until the earliest entry is due: wake it only if this one is
            # due sooner (a job per few milliseconds would otherwise wake it for each job)
            sooner = not self._heap or due < self._heap[0][0]
            self._push(keeper, due)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="otel-taskctx-lock-refresher", daemon=True
                )
                start_detached(self._thread)
            elif sooner:
                self.wakeups += 1
                self._cond.notify()

    def remove(self, keeper: LockKeeper, timeout: float | None) -> None:
        with self._cond:
            if keeper._active:
                keeper._active = False
                self._active -= 1
            if self._current is keeper and threading.current_thread() is not self._thread:
                self._cond.wait_for(lambda: self._current is not keeper, timeout)
            # stopped entries stay in the heap until due (the thread sleeps until the first
            # of them: see _next); compact when they dominate. An emptied heap makes the next
            # add wake the thread, hence a generous bound
            if len(self._heap) > 2 * self._active + COMPACT_AFTER:
                self._heap = [entry for entry in self._heap if entry[2]._active]
                heapq.heapify(self._heap)

    def _push(self, keeper: LockKeeper, due: float) -> None:
        keeper._due = due
        heapq.heappush(self._heap, (due, next(self._seq), keeper))

    def _next(self) -> LockKeeper:
        """Wait for the next due keeper (with the condition held); close the thread's
        database connections first when nothing is due soon.

        Entries of stopped keepers are dropped only once due, never before the thread goes
        to sleep: the thread sleeps until the heap's first entry, so an ``add`` (always due
        later with one interval for all) does not have to wake it. Dropping them on waking
        emptied the heap after every short job, and the next job's ``add`` woke the thread
        again: one wake-up (and GIL hand-over) per job."""
        closed = False
        while True:
            heap = self._heap
            now = time.monotonic()
            while heap and heap[0][0] <= now:
                due, _, keeper = heapq.heappop(heap)
                if keeper._active and keeper._due == due:  # not a stopped or superseded entry
                    return keeper
            wait = heap[0][0] - now if heap else None
            if not closed and (wait is None or wait > IDLE_CLOSE_AFTER):
                closed = True
                self._cond.release()
                try:
                    _close_thread_connections()
                finally:
                    self._cond.acquire()
                continue  # the schedule may have changed meanwhile
            self._cond.wait(wait)

    def _run(self) -> None:
        while True:
            with self._cond:
                keeper = self._next()
                self._current = keeper
            try:
                keeper._round()
            finally:
                with self._cond:
                    self._current = None
                    if keeper._active:
                        self._push(keeper, time.monotonic() + keeper.interval)
                    self._cond.notify_all()


_the_refresher = _Refresher()


def _refresher() -> _Refresher:
    return _the_refresher


def _after_fork_in_child() -> None:
    global _the_refresher
    _the_refresher = _Refresher()  # the parent's thread and schedule do not exist here


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _close_thread_connections() -> None:
    """Close the database connections this thread opened (the cache may be a DB cache)."""
    try:
        from django.db import connections

        connections.close_all()
    except Exception:  # pragma: no cover - Django not configured
        pass


def start_keeping_locks_alive(
    task_key: str,
    manager: Any = None,
    interval: float | None = None,
    ttl: int | None = None,
) -> LockKeeper | None:
    """Start refreshing ``task_key``'s locks (see :func:`keep_locks_alive`); the caller stops
    the returned keeper. None when refreshing is off (interval 0 or locks without TTL)."""
    from otel_taskctx.conflicts import get_conflict_store

    if manager is None:
        from powercrud.async_manager import AsyncManager

        manager = AsyncManager()
    if interval is None:
        from otel_taskctx.conf import get_setting

        interval = get_setting("LOCK_REFRESH_INTERVAL")
    store_ttl = get_conflict_store(manager).ttl if ttl is None else ttl
    if not interval or interval <= 0 or not store_ttl:
        return None
    if interval * 2 > store_ttl:
        log.warning(
            "lock refresh interval %ss is more than half the lock TTL %ss: locks of task %s "
            "may expire between refreshes",
            interval,
            store_ttl,
            task_key,
        )
    return LockKeeper(task_key, manager, interval, ttl).start()


@contextmanager
def keep_locks_alive(
    task_key: str,
    manager: Any = None,
    interval: float | None = None,
    ttl: int | None = None,
) -> Iterator[LockKeeper | None]:
    """Refresh the TTL of ``task_key``'s locks every ``interval`` seconds while the block runs.

    ``manager`` is the task's powercrud ``AsyncManager`` (default: a new ``AsyncManager()``),
    ``interval`` defaults to ``OTEL_TASKCTX["LOCK_REFRESH_INTERVAL"]`` (60 s) and ``ttl`` to the
    store's lock TTL. Yields the :class:`LockKeeper` (None when refreshing is off: interval 0
    or locks without TTL). Refreshing stops when the block exits, also on error; a dead worker
    stops refreshing and its locks expire one TTL later.
    """
    keeper = start_keeping_locks_alive(task_key, manager, interval, ttl)
    try:
        yield keeper
    finally:
        if keeper is not None:
            keeper.stop()
