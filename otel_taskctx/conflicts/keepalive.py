"""Keeping a running job's locks alive: a background thread refreshes their TTLs.

Locks carry a TTL (``OTEL_TASKCTX["LOCK_TTL"]``, default powercrud's ``CONFLICT_TTL``) so
that a worker that dies does not leave objects locked forever. A job that runs longer than
the TTL would lose its locks under it, so the worker wraps the job in
:func:`keep_locks_alive`, which refreshes every lock the task still holds every
``interval`` seconds and stops when the block ends. If the process dies, the thread dies
with it and the locks expire one TTL later.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("otel_taskctx.conflicts")


class LockKeeper(threading.Thread):
    """The refresher thread; also usable directly (``start()`` / ``stop()``)."""

    def __init__(self, task_key: str, manager: Any, interval: float, ttl: int | None = None):
        super().__init__(name=f"otel-taskctx-locks-{task_key[:40]}", daemon=True)
        self.task_key = task_key
        self.manager = manager
        self.interval = float(interval)
        self.ttl = ttl
        self.refreshes = 0  #: completed refresh rounds
        self.refreshed = 0  #: locks refreshed by the last round
        self.last_error: BaseException | None = None
        self._stop_event = threading.Event()

    def refresh_now(self) -> int:
        """Refresh once, in the calling thread. Returns the number of locks refreshed."""
        from otel_taskctx.conflicts import get_conflict_store

        store = get_conflict_store(self.manager)
        count = store.refresh(self.task_key, self.ttl)
        self.refreshed = count
        self.refreshes += 1
        return count

    def run(self) -> None:
        try:
            while not self._stop_event.wait(self.interval):
                try:
                    self.refresh_now()
                except Exception as exc:  # keep trying: the next round may succeed
                    self.last_error = exc
                    log.warning("could not refresh the locks of task %s: %s", self.task_key, exc)
        finally:
            _close_thread_connections()

    def stop(self, timeout: float | None = 10.0) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)


def _close_thread_connections() -> None:
    """Close the database connections this thread opened (the cache may be a DB cache)."""
    try:
        from django.db import connections

        connections.close_all()
    except Exception:  # pragma: no cover - Django not configured
        pass


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
    or locks without TTL). The thread stops when the block exits, also on error; a dead worker
    stops refreshing and its locks expire one TTL later.
    """
    from otel_taskctx.conflicts import get_conflict_store

    if manager is None:
        from powercrud.async_manager import AsyncManager

        manager = AsyncManager()
    if interval is None:
        from otel_taskctx.conf import get_setting

        interval = get_setting("LOCK_REFRESH_INTERVAL")
    store_ttl = get_conflict_store(manager).ttl if ttl is None else ttl
    if not interval or interval <= 0 or not store_ttl:
        yield None
        return
    if interval * 2 > store_ttl:
        log.warning(
            "lock refresh interval %ss is more than half the lock TTL %ss: locks of task %s "
            "may expire between refreshes",
            interval,
            store_ttl,
            task_key,
        )
    keeper = LockKeeper(task_key, manager, interval, ttl)
    keeper.start()
    try:
        yield keeper
    finally:
        keeper.stop()
