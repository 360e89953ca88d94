"""One background thread per process that writes span rows to the database.

Why a thread of its own: the rows must never join the caller's transaction (a job inside
``transaction.atomic`` that calls ``force_flush`` must not have its transaction broken by, or
rolled back with, our INSERT), and the writes need their own connection. On a server database
that connection stays open while batches keep coming (opening one per batch costs a PostgreSQL
backend start each time) and is closed once the writer has been idle for ``keep_alive``
seconds, so no idle connection stays behind for long (PostgreSQL's ``DROP DATABASE`` waits up
to 5 seconds for it).

Writes are batched: everything queued when the thread wakes up goes into one transaction.
A failing write ("database is locked", disk full, table missing before ``migrate``) is retried
a few times for lock errors, then logged and dropped; it never reaches the code that made the
span.

Start rows (spans still running) are written only for spans that are still running
``running_delay`` seconds after they started, so short spans cost one write, not two.

Each span is written to the database it was made for: the writer notes the span database's
``NAME`` when a span ends (or starts running, or a batch is submitted) and drops what was made
for another one. A test run's spans still queued when Django's test database has gone (its
``NAME`` is the configured database's again) never reach the configured database, and a
connection opened before the test database was set up is not reused for it. The writer
changes no setting of the database or its connections.

The statements are in :mod:`otel_taskctx.spans.sqlite` and :mod:`otel_taskctx.spans.postgres`;
other databases get the ORM's portable upsert (:mod:`otel_taskctx.spans.orm`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from otel_taskctx.context import start_detached
from otel_taskctx.spans import orm, postgres, sqlite
from otel_taskctx.spans.live import LiveSpans
from otel_taskctx.spans.rows import current_pid, span_row
from otel_taskctx.spans.table import span_database, span_target

log = logging.getLogger("otel_taskctx.spans")

#: seconds between two warnings about failed writes
WARN_INTERVAL = 60.0
LOCK_RETRIES = 3

#: seconds between two writes of ended spans (a flush, or this many queued, writes them now)
FINISHED_INTERVAL = 1.0
FINISHED_BATCH = 512
#: seconds the writer keeps its connection after the last batch: longer than the span store's
#: export schedule (1 s), so a process exporting once a second does not reconnect (a
#: PostgreSQL backend start) for every batch, and short enough for ``DROP DATABASE``
KEEP_ALIVE = 2.5


@dataclass
class _Request:
    rows: list[dict[str, Any]]
    finished: bool  # True: upsert complete rows; False: insert running rows if absent
    force_running: bool = False  # also write every tracked running span now
    target: Any = None  # the database the rows are for (see ``SpanWriter.target``)
    done: threading.Event = field(default_factory=threading.Event)
    ok: bool = False


class SpanWriter:
    """Writes span rows from a queue, in its own thread and database connection."""

    def __init__(
        self,
        max_len_getter: Callable[[], int] | None = None,
        running_delay: float = 1.0,
        interval: float = 0.5,
        using: str | None = None,
        keep_alive: float = KEEP_ALIVE,
        finished_interval: float = FINISHED_INTERVAL,
    ) -> None:
        self.running_delay = running_delay
        self.interval = interval
        self.finished_interval = finished_interval
        self._finished_due = 0.0
        self.keep_alive = keep_alive
        self._last_write = 0.0
        self._session_ready: Any = None  # the raw connection last used for a write
        self._session_target: Any = None  # the database it was opened to
        self._running_rows: set[tuple[str, str]] = set()  # (trace, span) with a running row
        self.using = using
        self._max_len_getter = max_len_getter
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._requests: deque[_Request] = deque()
        self._running: deque[tuple[float, Any, Any]] = deque()  # (due time, live span, target)
        self._finished: deque[tuple[Any, Any]] = deque()  # (ended span, target)
        self._live = LiveSpans()  # open spans with a running row
        self._thread: threading.Thread | None = None
        self._pid = current_pid()
        self._last_warning = 0.0
        self.dropped = 0
        self.written = 0
        self.max_running_queue = 100_000
        self.max_finished_queue = 100_000
        self.dropped_elsewhere = 0  # rows made for another database (a test database gone)

    # ------------------------------------------------------------------ producer side
    def max_len(self) -> int:
        if self._max_len_getter is not None:
            try:
                return int(self._max_len_getter())
            except Exception:  # settings unavailable: use the default
                pass
        return 4096

    def _ensure_thread(self) -> None:
        pid = current_pid()
        if pid != self._pid:  # forked: the parent's thread and queue do not exist here
            self._lock = threading.Lock()
            self._wake = threading.Event()
            self._requests = deque()
            self._running = deque()
            self._finished = deque()
            self._live = LiveSpans()
            self._running_rows = set()
            self._session_ready = None
            self._thread = None
            self._pid = pid
        thread = self._thread
        if thread is None or not thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(
                        target=self._run, name="otel-taskctx-span-writer", daemon=True
                    )
                    start_detached(self._thread)

    def target(self) -> Any:
        """The database the span table is written to now (see :func:`span_target`)."""
        return span_target(self.using)

    def submit(self, rows: list[dict[str, Any]], finished: bool = True) -> _Request:
        self._ensure_thread()
        request = _Request(rows, finished, target=self.target())
        with self._lock:
            self._requests.append(request)
        self._wake.set()
        return request

    def track_running(self, span: Any) -> None:
        """Write a "running" row for ``span`` if it has not ended after ``running_delay``."""
        if len(self._running) >= self.max_running_queue:
            return
        if self._thread is None or self._pid != current_pid():
            # (once per process: a thread that died is restarted by the next submit or flush,
            # and this runs for every span started)
            self._ensure_thread()
        self._running.append((time.monotonic() + self.running_delay, span, self.target()))

    def add_finished(self, span: Any) -> None:
        """Write the row of ``span`` (ended) at the writer's next pass."""
        if len(self._finished) >= self.max_finished_queue:
            self.dropped += 1
            return
        if self._thread is None or self._pid != current_pid():
            self._ensure_thread()
        self._finished.append((span, self.target()))

    def flush(self, timeout: float | None = 5.0, running: bool = True) -> bool:
        """Write everything queued now (running rows too, with ``running``); wait for it."""
        self._ensure_thread()
        marker = _Request([], True, force_running=running)
        with self._lock:
            self._requests.append(marker)
        self._wake.set()
        return marker.done.wait(timeout)

    # ------------------------------------------------------------------ writer side
    def _run(self) -> None:
        from opentelemetry.instrumentation.utils import suppress_instrumentation

        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            try:
                with suppress_instrumentation():
                    self._cycle()
                if self._last_write and time.monotonic() - self._last_write >= self.keep_alive:
                    self._close_connection()
            except Exception:  # pragma: no cover - never let the thread die
                log.exception("otel_taskctx span writer failed")

    def _take_running(self, force: bool) -> list[tuple[Any, Any]]:
        now = time.monotonic()
        due: list[tuple[Any, Any]] = []
        queue = self._running
        while queue:
            when, span, target = queue[0]
            if not force and when > now:
                break
            queue.popleft()
            if span.end_time is None and span not in self._live:
                due.append((span, target))
        self._live.add(span for span, _ in due)
        self._live.prune()
        if len(self._live):  # spans open under one with a running row: recorded now
            waiting = list(queue)
            targets = {id(span): target for _, span, target in waiting}
            opened = self._live.open_under([span for _, span, _ in waiting])
            due.extend((span, targets[id(span)]) for span in opened)
        return due

    def _take_finished(self, force: bool) -> list[tuple[Any, Any]]:
        queue = self._finished
        now = time.monotonic()
        if not queue or not (force or now >= self._finished_due or len(queue) >= FINISHED_BATCH):
            return []
        self._finished_due = now + self.finished_interval
        return [queue.popleft() for _ in range(len(queue))]

    def _cycle(self) -> None:
        with self._lock:
            requests = list(self._requests)
            self._requests.clear()
        force = any(r.force_running for r in requests)
        running_spans = self._take_running(force)
        ended = self._take_finished(bool(requests))
        if not requests and not running_spans and not ended:
            return
        target = self.target()
        max_len = self.max_len()
        running_rows, elsewhere = _rows_for(running_spans, target, max_len, running=True)
        rows, more = _rows_for(ended, target, max_len, running=False)
        elsewhere += more
        finished_rows = {(row["trace_id"], row["span_id"]): row for row in rows}
        for request in requests:
            if request.target != target:
                elsewhere += len(request.rows)
            elif not request.finished:
                running_rows.extend(request.rows)
            else:
                for row in request.rows:
                    finished_rows[(row["trace_id"], row["span_id"])] = row
        if elsewhere:  # made for a test database that has gone
            self.dropped += elsewhere
            self.dropped_elsewhere += elsewhere
            log.debug("dropped %d span(s) made for another database than %r", elsewhere, target)
        ok = self._write(list(finished_rows.values()), running_rows)
        for request in requests:
            request.ok = ok and request.target == target
            request.done.set()

    def _write(self, finished: list[dict[str, Any]], running: list[dict[str, Any]]) -> bool:
        if not finished and not running:
            return True
        from django.db import OperationalError

        delay = 0.1
        for attempt in range(LOCK_RETRIES + 1):
            try:
                self._write_once(finished, running)
                self.written += len(finished) + len(running)
                self._after_batch()
                return True
            except OperationalError as exc:
                if "locked" in str(exc).lower() and attempt < LOCK_RETRIES:
                    time.sleep(delay)
                    delay *= 3
                    continue
                self._drop(len(finished) + len(running), exc)
                self._close_connection()  # it may be broken (server restarted, network)
                return False
            except Exception as exc:
                self._drop(len(finished) + len(running), exc)
                self._close_connection()
                return False
        return False  # pragma: no cover

    def _drop(self, count: int, exc: BaseException) -> None:
        self.dropped += count
        now = time.monotonic()
        if now - self._last_warning >= WARN_INTERVAL:
            self._last_warning = now
            text = str(exc).lower()
            hint = ""
            if "no such table" in text or "does not exist" in text:
                hint = " (run 'manage.py migrate' to create the span table)"
            log.warning(
                "otel_taskctx: could not store %d span(s), dropped them: %s: %s%s",
                count,
                type(exc).__name__,
                exc,
                hint,
            )
        else:
            log.debug("could not store %d span(s): %s", count, exc)

    def _alias(self) -> str:
        return span_database(self.using)

    def _write_once(self, finished: list[dict[str, Any]], running: list[dict[str, Any]]) -> None:
        from django.db import connections

        alias = self._alias()
        connection = connections[alias]
        target = (alias, connection.settings_dict.get("NAME"))
        if connection.connection is not None and self._session_target != target:
            # opened to another database: before the test database was set up, or to the
            # test database that has gone since
            connection.close()
        connection.ensure_connection()
        if connection.connection is not self._session_ready:
            if self._session_target != target:
                self._running_rows.clear()  # rows this writer wrote to another database
            self._session_ready = connection.connection
            self._session_target = target
        if connection.vendor == "sqlite":
            sqlite.write(connection, finished, running)
        elif connection.vendor == "postgresql":
            postgres.write(connection.connection, finished, running, self._running_rows)
        else:
            orm.write(alias, finished, running)

    def _after_batch(self) -> None:
        """SQLite: keep the file open (a local file: nothing to give back to a server).

        Server databases: keep the connection while batches keep coming; the writer thread
        closes it after ``keep_alive`` idle seconds (``keep_alive = 0``: after each batch).
        """
        try:
            from django.db import connections

            if connections[self._alias()].vendor == "sqlite":
                return
        except Exception:  # pragma: no cover
            pass
        if self.keep_alive > 0:
            self._last_write = time.monotonic()
        else:
            self._close_connection()

    def _close_connection(self) -> None:
        self._last_write = 0.0
        try:
            from django.db import connections

            connections[self._alias()].close()
        except Exception:  # pragma: no cover
            pass


def _rows_for(
    spans: list[tuple[Any, Any]], target: Any, max_len: int, running: bool
) -> tuple[list[dict[str, Any]], int]:
    """The rows of the spans made for ``target``, and how many were made for another one."""
    rows, elsewhere = [], 0
    for span, made_for in spans:
        if made_for != target:
            elsewhere += 1
            continue
        try:
            row = span_row(span, max_len, running=running and span.end_time is None)
        except Exception:  # a span we cannot read: skip it
            log.debug("could not convert span %r", getattr(span, "name", span), exc_info=True)
            continue
        if row is not None:
            rows.append(row)
    return rows, elsewhere


_writer: SpanWriter | None = None
_writer_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _writer_lock
    _writer_lock = threading.Lock()  # it may have been held by another thread at fork time


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def get_writer() -> SpanWriter:
    """The process-wide writer."""
    global _writer
    if _writer is None:
        with _writer_lock:
            if _writer is None:
                from otel_taskctx.conf import get_setting

                _writer = SpanWriter(lambda: get_setting("MAX_ATTRIBUTE_LENGTH"))
    return _writer
