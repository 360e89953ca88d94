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
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from otel_taskctx._process import current_pid
from otel_taskctx.spans.live import LiveSpans

log = logging.getLogger("otel_taskctx.spans")

#: seconds between two warnings about failed writes
WARN_INTERVAL = 60.0
LOCK_RETRIES = 3
#: running rows remembered (to complete them with an upsert rather than a COPY)
MAX_TRACKED_RUNNING_ROWS = 100_000
#: seconds SQLite waits for another writer before a try fails
SQLITE_BUSY_TIMEOUT = 5.0


#: seconds the writer keeps its connection after the last batch: longer than the span store's
#: export schedule (1 s), so a process exporting once a second does not reconnect (a
#: PostgreSQL backend start) for every batch, and short enough for ``DROP DATABASE``
KEEP_ALIVE = 2.5


@dataclass
class _Request:
    rows: list[dict[str, Any]]
    finished: bool  # True: upsert complete rows; False: insert running rows if absent
    force_running: bool = False  # also write every tracked running span now
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
    ) -> None:
        self.running_delay = running_delay
        self.interval = interval
        self.keep_alive = keep_alive
        self._last_write = 0.0
        self._session_ready: Any = None  # the raw connection set up for telemetry writes
        self._running_rows: set[tuple[str, str]] = set()  # (trace, span) with a running row
        self.using = using
        self._max_len_getter = max_len_getter
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Condition(self._lock)
        self._requests: deque[_Request] = deque()
        self._running: deque[tuple[float, Any]] = deque()  # (due time, live span)
        self._live = LiveSpans()  # open spans with a running row
        self._busy = False
        self._thread: threading.Thread | None = None
        self._pid = current_pid()
        self._last_warning = 0.0
        self.dropped = 0
        self.written = 0
        self.max_running_queue = 100_000

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
            self._idle = threading.Condition(self._lock)
            self._wake = threading.Event()
            self._requests = deque()
            self._running = deque()
            self._live = LiveSpans()
            self._running_rows = set()
            self._session_ready = None
            self._busy = False
            self._thread = None
            self._pid = pid
        thread = self._thread
        if thread is None or not thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(
                        target=self._run, name="otel-taskctx-span-writer", daemon=True
                    )
                    self._thread.start()

    def submit(self, rows: list[dict[str, Any]], finished: bool = True) -> _Request:
        self._ensure_thread()
        request = _Request(rows, finished)
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
        self._running.append((time.monotonic() + self.running_delay, span))

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

    def _take_running(self, force: bool) -> list[Any]:
        now = time.monotonic()
        due: list[Any] = []
        queue = self._running
        while queue:
            when, span = queue[0]
            if not force and when > now:
                break
            queue.popleft()
            if span.end_time is None and span not in self._live:
                due.append(span)
        self._live.add(due)
        self._live.prune()
        if len(self._live):  # spans open under one with a running row: recorded now
            due.extend(self._live.open_under([span for _, span in list(queue)]))
        return due

    def _cycle(self) -> None:
        with self._lock:
            requests = list(self._requests)
            self._requests.clear()
        force = any(r.force_running for r in requests)
        running_spans = self._take_running(force)
        if not requests and not running_spans:
            return
        from otel_taskctx.spans.rows import span_row

        max_len = self.max_len()
        running_rows = []
        for span in running_spans:
            try:
                row = span_row(span, max_len, running=span.end_time is None)
            except Exception:  # a span we cannot read: skip it
                log.debug("could not snapshot a running span", exc_info=True)
                continue
            if row is not None:
                running_rows.append(row)
        finished_rows: dict[tuple[str, str], dict[str, Any]] = {}
        for request in requests:
            if not request.finished:
                running_rows.extend(request.rows)
                continue
            for row in request.rows:
                finished_rows[(row["trace_id"], row["span_id"])] = row
        ok = self._write(list(finished_rows.values()), running_rows)
        for request in requests:
            request.ok = ok
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
        if self.using:
            return self.using
        from django.db import router

        from otel_taskctx.span_models import TaskSpan

        return router.db_for_write(TaskSpan)

    def _write_once(self, finished: list[dict[str, Any]], running: list[dict[str, Any]]) -> None:
        from django.db import connections, transaction

        from otel_taskctx.span_models import TaskSpan

        alias = self._alias()
        connection = connections[alias]
        connection.ensure_connection()
        new_session = connection.connection is not self._session_ready
        if connection.vendor == "sqlite" and (new_session or not _in_wal_mode(connection)):
            _prepare_sqlite(connection)  # (until the WAL switch succeeds: every batch)
        elif connection.vendor == "postgresql" and new_session:
            # this session writes telemetry only: no need to wait for the WAL flush (a crash
            # may lose the last few milliseconds of spans, never the jobs' data or locks)
            with connection.cursor() as cursor:
                cursor.execute("SET synchronous_commit TO OFF")
        self._session_ready = connection.connection
        if connection.vendor == "postgresql":
            self._write_postgresql(connection.connection, finished, running)
            return
        if connection.vendor == "sqlite":
            if running and finished:
                with transaction.atomic(using=alias):
                    _upsert(connection, running, update=False)
                    _upsert(connection, finished, update=True)
            else:  # one statement (per chunk): autocommit
                _upsert(connection, running or finished, update=bool(finished))
            return
        with transaction.atomic(using=alias):
            if running:  # other databases: the ORM's (slower) portable upsert
                TaskSpan.objects.using(alias).bulk_create(
                    [TaskSpan(**row) for row in running], ignore_conflicts=True
                )
            if finished:
                fields = [k for k in finished[0] if k not in SPAN_KEY]
                TaskSpan.objects.using(alias).bulk_create(
                    [TaskSpan(**row) for row in finished],
                    update_conflicts=True,
                    unique_fields=list(SPAN_KEY),
                    update_fields=fields,
                )

    def _write_postgresql(
        self, raw: Any, finished: list[dict[str, Any]], running: list[dict[str, Any]]
    ) -> None:
        from otel_taskctx.spans import pg

        had_row = self._running_rows
        if running:
            pg.upsert(raw, running, update=False)
            if len(had_row) > MAX_TRACKED_RUNNING_ROWS:
                had_row.clear()  # only a shortcut: the COPY fallback stays correct
            had_row.update((row["trace_id"], row["span_id"]) for row in running)
        if not finished:
            return
        completing = [r for r in finished if (r["trace_id"], r["span_id"]) in had_row]
        new = [r for r in finished if (r["trace_id"], r["span_id"]) not in had_row]
        if new and not pg.copy_new(raw, new):
            completing += new  # some were in the table already: upsert them all
        if completing:
            pg.upsert(raw, completing, update=True)
            for row in completing:
                had_row.discard((row["trace_id"], row["span_id"]))

    def _after_batch(self) -> None:
        """SQLite: keep the file open (closing a WAL database checkpoints it every time).

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


_prepared: set[str] = set()
#: the span table's unique key (``start_hour``: the hour ``start_ns`` falls in)
SPAN_KEY = ("start_hour", "trace_id", "span_id")


def written_fields() -> list[Any]:
    """The span table's fields a write sets: all but the id."""
    from otel_taskctx.span_models import TaskSpan

    return [f for f in TaskSpan._meta.concrete_fields if not f.primary_key]


def row_value(row: dict[str, Any], name: str, default: Any) -> Any:
    """The value of column ``name`` for ``row``; ``start_hour`` always from ``start_ns``."""
    if name == "start_hour":
        from otel_taskctx.span_models import hour_of

        return hour_of(row["start_ns"])
    return row.get(name, default)


#: rows per INSERT statement of the raw upsert
UPSERT_CHUNK = 500


#: column types whose values the backend adapts (the rest go to SQLite as they are)
_ADAPTED = ("JSONField", "DateTimeField")


@dataclass(frozen=True)
class _SqlitePlan:
    """How rows become the parameters of the SQLite upsert (built once per process).

    Columns in the order their values are built: the plain ones straight from the row, then
    ``start_hour`` (always from ``start_ns``), then those the backend adapts (JSON text,
    datetimes).
    """

    table: str
    columns: str
    width: int  # columns per row
    row_placeholders: str
    key: str
    updates: str
    plain: tuple[tuple[str, Any], ...]
    json: tuple[tuple[str, Any], ...]
    datetimes: tuple[str, ...]


@functools.cache
def _sqlite_plan() -> _SqlitePlan:
    from otel_taskctx.span_models import TaskSpan

    fields = written_fields()
    kinds = {f.name: f.get_internal_type() for f in fields}
    plain = [f for f in fields if f.name != "start_hour" and kinds[f.name] not in _ADAPTED]
    json_fields = [f for f in fields if kinds[f.name] == "JSONField"]
    datetimes = [f for f in fields if kinds[f.name] == "DateTimeField"]
    ordered = [*plain, TaskSpan._meta.get_field("start_hour"), *json_fields, *datetimes]
    if len(ordered) != len(fields):  # a new kind of column: add it to the plan
        raise RuntimeError("the span table has a column the SQLite upsert does not handle")
    return _SqlitePlan(
        table=f'"{TaskSpan._meta.db_table}"',
        columns=", ".join(f'"{f.column}"' for f in ordered),
        width=len(ordered),
        row_placeholders="(" + ", ".join(["?"] * len(ordered)) + ")",
        key=", ".join(f'"{name}"' for name in SPAN_KEY),
        updates=", ".join(
            f'"{f.column}" = EXCLUDED."{f.column}"' for f in ordered if f.column not in SPAN_KEY
        ),
        plain=tuple((f.name, f.get_default()) for f in plain),
        json=tuple((f.name, f.get_default()) for f in json_fields),
        datetimes=tuple(f.name for f in datetimes),
    )


def _upsert(connection: Any, rows: list[dict[str, Any]], update: bool) -> None:
    """SQLite: ``INSERT ... ON CONFLICT``, a row per span, keyed by its hour and ids.

    ``update``: a finished span replaces whatever row is there; otherwise (a running span)
    the row is only inserted when absent, so it never overwrites a finished one.

    The statement goes to the ``sqlite3`` cursor with ``?`` placeholders: Django's cursor
    would rewrite every ``%s`` of a 500-row statement with a regular expression first. Errors
    still come out as Django's (``OperationalError`` for "database is locked": retried).
    """
    from otel_taskctx.span_models import hour_of

    plan = _sqlite_plan()
    action = f"DO UPDATE SET {plan.updates}" if update else "DO NOTHING"
    adapt_json = connection.ops.adapt_json_value
    adapt_datetime = connection.ops.adapt_datetimefield_value
    size = UPSERT_CHUNK
    max_params = getattr(connection.features, "max_query_params", None)
    if max_params:
        size = max(1, min(size, max_params // plan.width))
    with connection.wrap_database_errors:
        cursor = connection.connection.cursor()
        try:
            for start in range(0, len(rows), size):
                chunk = rows[start : start + size]
                params: list[Any] = []
                for row in chunk:
                    params.extend([row.get(name, default) for name, default in plan.plain])
                    params.append(hour_of(row["start_ns"]))
                    for name, default in plan.json:
                        value = row.get(name, default)
                        params.append("[]" if value == [] else adapt_json(value, None))
                    for name in plan.datetimes:
                        params.append(adapt_datetime(row.get(name)))
                values = ", ".join([plan.row_placeholders] * len(chunk))
                cursor.execute(
                    f"INSERT INTO {plan.table} ({plan.columns}) VALUES {values} "
                    f"ON CONFLICT ({plan.key}) {action}",
                    params,
                )
        finally:
            cursor.close()


def _in_wal_mode(connection: Any) -> bool:
    return str(connection.settings_dict.get("NAME")) in _prepared


def _prepare_sqlite(connection: Any) -> None:
    """WAL journal (readers never block the writer) and a generous busy timeout."""
    with connection.cursor() as cursor:
        name = str(connection.settings_dict.get("NAME"))
        if name not in _prepared and name != ":memory:" and "mode=memory" not in name:
            cursor.execute("PRAGMA busy_timeout = 0")  # never wait for the journal switch
            try:
                cursor.execute("PRAGMA journal_mode = WAL")
                _prepared.add(name)
            except Exception:  # another connection holds a lock: try again next batch
                pass
        cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT * 1000)}")
        # this connection only: in WAL mode NORMAL is safe and skips an fsync per batch
        cursor.execute("PRAGMA synchronous = NORMAL")


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
