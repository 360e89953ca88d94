"""Keeping a running job's locks alive: one refresher thread per process refreshes their TTLs
(a short job starts no thread and does not wake it; see docs/conflicts.md, *Lifecycle*)."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from otel_taskctx.context import start_detached

log = logging.getLogger("otel_taskctx.conflicts")


class LockKeeper:
    """One task's lock refreshing, every ``interval`` seconds between ``start()`` and ``stop()``."""

    def __init__(self, task_key: str, manager: Any, interval: float, ttl: int | None = None):
        self.task_key, self.manager, self.interval, self.ttl = task_key, manager, interval, ttl
        self.refreshes = 0  #: completed refresh rounds
        self.refreshed = 0  #: locks refreshed by the last round
        self.last_error: BaseException | None = None
        self.due: float | None = None  #: the next round (monotonic); None when stopped

    def refresh_now(self) -> int:
        """Refresh once, in the calling thread. Returns the number of locks refreshed."""
        from otel_taskctx.conflicts import get_conflict_store

        self.refreshed = get_conflict_store(self.manager).refresh(self.task_key, self.ttl)
        self.refreshes += 1
        return self.refreshed

    def start(self) -> LockKeeper:
        return refresher.add(self)

    def stop(self, timeout: float | None = 10.0) -> None:
        """No refresh after this returns (a round under way is waited for)."""
        refresher.remove(self, timeout)

    def is_alive(self) -> bool:
        return self.due is not None


class Refresher:
    """The process's refresher thread, asleep until ``wake_at`` unless a keeper is due sooner."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.keepers: dict[LockKeeper, None] = {}
        self.wake_at = math.inf
        self.current: LockKeeper | None = None
        self.thread: threading.Thread | None = None
        self.wakeups = 0  #: times an ``add`` woke the sleeping thread

    def add(self, keeper: LockKeeper) -> LockKeeper:
        with self.cond:
            if keeper.due is not None:
                return keeper
            keeper.due = time.monotonic() + keeper.interval
            self.keepers[keeper] = None
            if self.thread is None:
                self.thread = threading.Thread(
                    target=self.run, name="otel-taskctx-lock-refresher", daemon=True
                )
                start_detached(self.thread)
            elif keeper.due < self.wake_at:
                self.wakeups += 1
                self.wake_at = keeper.due
                self.cond.notify_all()
        return keeper

    def remove(self, keeper: LockKeeper, timeout: float | None) -> None:
        with self.cond:
            keeper.due = None
            self.keepers.pop(keeper, None)
            if threading.current_thread() is not self.thread:
                self.cond.wait_for(lambda: self.current is not keeper, timeout)

    def run(self) -> None:
        from django.db import connections

        with self.cond:
            while True:
                moment = time.monotonic()
                for keeper in [k for k in self.keepers if k.due is not None and k.due <= moment]:
                    if keeper.due is None:  # stopped while an earlier one refreshed
                        continue
                    self.current = keeper
                    self.cond.release()
                    try:
                        keeper.refresh_now()
                    except Exception as exc:  # the next round may succeed
                        keeper.last_error = exc
                        log.warning("could not refresh the locks of %s: %s", keeper.task_key, exc)
                    finally:
                        self.cond.acquire()
                    self.current = None
                    if keeper.due is not None:
                        keeper.due = time.monotonic() + keeper.interval
                    self.cond.notify_all()
                    connections.close_all()  # (this thread's; a round per minute reconnects)
                # until the earliest round due, or a stopped one's if sooner
                nxt = min((k.due for k in self.keepers if k.due), default=math.inf)
                if nxt < self.wake_at or self.wake_at <= time.monotonic():
                    self.wake_at = nxt
                wait = self.wake_at - time.monotonic()
                self.cond.wait(None if wait == math.inf else max(wait, 0))


refresher = Refresher()


def _after_fork_in_child() -> None:
    global refresher
    refresher = Refresher()  # the parent's thread does not exist here


if hasattr(os, "register_at_fork"):  # (not on Windows)
    os.register_at_fork(after_in_child=_after_fork_in_child)


def start_keeping_locks_alive(
    task_key: str, manager: Any = None, interval: float | None = None, ttl: int | None = None
) -> LockKeeper | None:
    """Start refreshing ``task_key``'s locks (see :func:`keep_locks_alive`); the caller stops
    the returned keeper. None when refreshing is off (interval 0 or locks without TTL)."""
    from otel_taskctx.conf import get_setting
    from otel_taskctx.conflicts import get_conflict_store

    if manager is None:
        from powercrud.async_manager import AsyncManager

        manager = AsyncManager()
    interval = get_setting("LOCK_REFRESH_INTERVAL") if interval is None else interval
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
    task_key: str, manager: Any = None, interval: float | None = None, ttl: int | None = None
) -> Iterator[LockKeeper | None]:
    """Refresh the TTL of the locks ``task_key`` still holds every ``interval`` seconds
    (``LOCK_REFRESH_INTERVAL``) while the block runs; yields the :class:`LockKeeper`, or None
    when refreshing is off. ``manager`` defaults to a new ``AsyncManager()``."""
    keeper = start_keeping_locks_alive(task_key, manager, interval, ttl)
    try:
        yield keeper
    finally:
        if keeper is not None:
            keeper.stop()
