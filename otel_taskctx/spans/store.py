"""The span store: spans written to :class:`~otel_taskctx.models.TaskSpan` through the ORM by
the SDK's ``BatchSpanProcessor``, with a "running" row for spans still open (docs/viewer.md,
"The span store"); and the exporters of ``OTEL_TRACES_EXPORTER`` on our private provider."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Any

from opentelemetry import context
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

from otel_taskctx.context import attached, start_detached
from otel_taskctx.spans.rows import span_row
from otel_taskctx.tracer_provider import (
    add_span_processor_once,
    added_processors,
    created_here,
    host_tracer_provider,
    registered_processors,
)

log = logging.getLogger("otel_taskctx.spans")

#: the names under which the store's processors join the tracer providers
STORE = "otel_taskctx.span_store"
RUNNING = "otel_taskctx.span_store.running"
#: the names of the exporters added for ``OTEL_TRACES_EXPORTER`` start with this
ENV_PREFIX = "otel_taskctx.env_exporter."
SPAN_KEY = ("start_hour", "trace_id", "span_id")
BATCH = 512  # spans per export
LOCK_RETRIES = 3
#: seconds between two warnings about spans that could not be written
WARN_INTERVAL = 60.0
_lock = threading.Lock()
_last_warning = 0.0


def _reset_lock() -> None:
    global _lock
    _lock = threading.Lock()  # another thread may have held it when the process forked


os.register_at_fork(after_in_child=_reset_lock)


def span_target(using: str | None = None) -> tuple[str, Any]:
    """``(alias, NAME)`` of the database the span table is written to now: Django's test
    runner switches ``NAME`` to the test database and back."""
    from django.conf import settings
    from django.db import router

    from otel_taskctx.models import TaskSpan

    alias = using or router.db_for_write(TaskSpan)
    return alias, settings.DATABASES[alias].get("NAME")


class DatabaseSpanExporter(SpanExporter):
    """Upserts spans into the span table; never raises. Spans made for another ``target`` than
    the database the settings name now (a test database gone) are dropped."""

    running = False  # True: insert rows of running spans where absent

    def __init__(self, target: tuple[str, Any] | None = None, using: str | None = None) -> None:
        self.target = target
        self.using = using
        self.dropped = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            now = self.made_for_now(spans)
            if now is None:
                return SpanExportResult.FAILURE
            from otel_taskctx.conf import get_setting

            max_len = get_setting("MAX_ATTRIBUTE_LENGTH")
            made = (span_row(span, max_len, running=self.running) for span in spans)
            rows = {(row["trace_id"], row["span_id"]): row for row in made if row is not None}
            ok = self.write(list(rows.values()), now[0])
        except Exception as exc:  # never into the caller
            ok = self._drop(len(spans), exc)
        return SpanExportResult.SUCCESS if ok else SpanExportResult.FAILURE

    def made_for_now(self, spans: Sequence[Any]) -> tuple[str, Any] | None:
        """The span database now, or None (``spans`` dropped) if they were made for another."""
        now = span_target(self.using)
        if self.target in (None, now):
            return now
        self.dropped += len(spans)
        log.debug("dropped %d span(s) made for %r, not %r", len(spans), self.target, now)
        return None

    def write(self, rows: list[dict[str, Any]], alias: str) -> bool:
        """Write ``rows`` on this thread's connection (closed again if it was), never inside
        the caller's transaction: there, on a thread of its own."""
        from django.db import OperationalError, connections

        connection = connections[alias]
        if not rows:
            return True
        try:  # Django refuses database access in an event loop
            in_loop = asyncio.get_running_loop() is not None
        except RuntimeError:
            in_loop = False
        if connection.in_atomic_block or in_loop:
            thread = threading.Thread(target=self.write, args=(rows, alias), daemon=True)
            start_detached(thread)
            if connection.vendor != "sqlite" and not in_loop:  # (SQLite: waits for the commit)
                thread.join(10)
            return True
        opened = connection.connection is None
        try:
            for attempt in range(LOCK_RETRIES + 1):
                try:
                    with suppress_instrumentation():
                        self._upsert(rows, alias)
                    return True
                except OperationalError as exc:  # "database is locked": retried
                    if "locked" not in str(exc).lower() or attempt == LOCK_RETRIES:
                        raise
                    time.sleep(0.1 * 3**attempt)
        except Exception as exc:
            return self._drop(len(rows), exc)
        finally:
            if opened:
                connection.close()

    def _upsert(self, rows: list[dict[str, Any]], alias: str) -> None:
        from otel_taskctx.models import TaskSpan

        spans = TaskSpan.objects.using(alias)
        objects = [TaskSpan(**row) for row in rows]
        if self.running:
            spans.bulk_create(objects, ignore_conflicts=True)
            return
        fields = [f.name for f in TaskSpan._meta.concrete_fields if not f.primary_key]
        spans.bulk_create(
            objects,
            update_conflicts=True,
            unique_fields=SPAN_KEY,
            update_fields=[name for name in fields if name not in SPAN_KEY],
        )

    def _drop(self, count: int, exc: BaseException) -> bool:
        """Logged (a warning at most once a minute) and dropped: never into the caller."""
        global _last_warning
        self.dropped += count
        warn = time.monotonic() - _last_warning >= WARN_INTERVAL
        _last_warning = time.monotonic() if warn else _last_warning
        missing = any(text in str(exc).lower() for text in ("no such table", "does not exist"))
        hint = " (run 'manage.py migrate' to create the span table)" if missing else ""
        level = logging.WARNING if warn else logging.DEBUG
        log.log(level, "otel_taskctx: could not store %d span(s), dropped: %r%s", count, exc, hint)
        return False


class StoreSpanProcessor(SpanProcessor):
    """Stores finished spans through the SDK's ``BatchSpanProcessor`` for the span database the
    settings name now: made at the first span (a qcluster forks with no thread of ours alive),
    made anew (the old one's spans dropped) when the settings name another."""

    def __init__(self, schedule_delay_millis: float = 1000, using: str | None = None) -> None:
        self.schedule_delay_millis = schedule_delay_millis
        self.using = using
        self._current: tuple[Any, BatchSpanProcessor | None] = (None, None)

    def _exporter(self, target: Any) -> DatabaseSpanExporter:
        return DatabaseSpanExporter(target, self.using)

    def batch(self) -> BatchSpanProcessor:
        target = span_target(self.using)
        made_for, batch = self._current
        if batch is not None and made_for == target:
            return batch
        with _lock:
            made_for, old = self._current
            if old is None or made_for != target:
                with attached(context.Context()):  # its thread runs in no job
                    batch = BatchSpanProcessor(
                        self._exporter(target),
                        schedule_delay_millis=self.schedule_delay_millis,
                        max_export_batch_size=BATCH,
                    )
                self._current = (target, batch)
                if old is not None:
                    old.shutdown()
        return self._current[1]

    def on_end(self, span: ReadableSpan) -> None:
        try:
            self.batch().on_end(span)
        except Exception:  # pragma: no cover - never into the caller
            log.debug("could not queue a span for the store", exc_info=True)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        batch = self._current[1]
        return batch is None or batch.force_flush(timeout_millis)

    def shutdown(self) -> None:
        batch = self._current[1]
        if batch is not None:
            batch.shutdown()


class RunningSpanProcessor(StoreSpanProcessor):
    """Gives spans still running ``running_delay`` seconds after they started a "running" row,
    and the spans open under one that has a row, whatever their age (the step a job is in);
    spans too young go back to the queue of its batch processor."""

    def __init__(self, running_delay: float = 1.0, schedule_delay_millis: float = 500, using=None):
        super().__init__(schedule_delay_millis, using)
        self.running_delay = running_delay
        self.forcing = self.closing = False

    def _exporter(self, target: Any) -> DatabaseSpanExporter:
        return _RunningRows(self, target)

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        super().on_end(span)  # queued while it runs (the batch processor takes sampled ones)

    def on_end(self, span: ReadableSpan) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        self.forcing = True  # a running row for every span still open now
        try:
            return super().force_flush(timeout_millis)
        finally:
            self.forcing = False

    def shutdown(self) -> None:
        self.closing = True  # spans still too young are not queued again
        super().shutdown()


class _RunningRows(DatabaseSpanExporter):
    running = True

    def __init__(self, processor: RunningSpanProcessor, target: Any) -> None:
        super().__init__(target, processor.using)
        self.processor = processor
        self.recorded: dict[tuple[int, int], Any] = {}  # open spans with a running row

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        if self.made_for_now(spans) is None:
            return SpanExportResult.FAILURE
        now = time.time_ns()
        delay = self.processor.running_delay * 1e9
        force = self.processor.forcing or len(spans) >= BATCH  # a full batch: no going round
        self.recorded = {k: s for k, s in self.recorded.items() if s.end_time is None}
        due, young = [], []
        for span in sorted(spans, key=lambda s: s.start_time or 0):
            if span.end_time is not None:
                continue
            parent = span.parent and (span.parent.trace_id, span.parent.span_id)
            if force or now - span.start_time >= delay or parent in self.recorded:
                self.recorded[span.context.trace_id, span.context.span_id] = span
                due.append(span)
            else:
                young.append(span)
        for span in [] if self.processor.closing else young:
            self.processor.on_start(span)
        return super().export(due)


def install_span_store() -> bool:
    """Store spans in the database (the app's ``ready()`` does, with ``SPAN_STORE``)."""
    if add_span_processor_once(STORE, StoreSpanProcessor, create=False) is None:
        return False
    add_span_processor_once(RUNNING, RunningSpanProcessor, create=False)
    return True


def flush_span_store(
    timeout: float = 5.0, include_exporters: bool = True, running: bool = True
) -> bool:
    """Write this process's pending spans now (``running``: the running ones' rows too), and
    push the exporters of ``OTEL_TRACES_EXPORTER``."""
    ok, millis = True, int(timeout * 1000)
    for name, processor in registered_processors().items():
        if name == STORE or (name == RUNNING and running):
            ok = processor.force_flush(millis) and ok
        elif name.startswith(ENV_PREFIX) and include_exporters:
            processor.force_flush(millis)
    return ok


def requested_exporters(environ: dict[str, str] | None = None) -> list[str]:
    """``OTEL_TRACES_EXPORTER``'s names (default: ``otlp`` if an OTLP endpoint is set)."""
    env = os.environ if environ is None else environ
    value = env.get("OTEL_TRACES_EXPORTER")
    if value is None:
        endpoint = "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
        return ["otlp"] if any(env.get(name) for name in endpoint) else []
    names = [n.strip().lower() for n in value.split(",") if n.strip()]
    return [n for n in names if n != "none"]


def _processor(name: str, env: dict[str, str]) -> Any | None:
    """A processor for the exporter ``name`` (an ``opentelemetry_traces_exporter`` entry
    point; ``otlp`` is ``otlp_proto_http``, or ``otlp_proto_grpc`` with that protocol)."""
    if name == "otlp":
        protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
            "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
        )
        name = "otlp_proto_grpc" if protocol == "grpc" else "otlp_proto_http"
    try:
        exporter = next(iter(entry_points(group="opentelemetry_traces_exporter", name=name)))
        exporter = exporter.load()()
    except Exception as exc:
        log.warning(
            "otel_taskctx: could not make span exporter %r for OTEL_TRACES_EXPORTER (%s); "
            "for OTLP: pip install 'otel-taskctx[otlp]'",
            name,
            "not installed" if isinstance(exc, StopIteration) else exc,
        )
        return None
    kind = SimpleSpanProcessor if name == "console" else BatchSpanProcessor
    return functools.partial(kind, exporter)


def install_env_exporters(environ: dict[str, str] | None = None, provider: Any = None) -> list[str]:
    """Add the exporters the environment names to otel_taskctx's private provider (none when
    the host has a provider), or to ``provider`` if we created it; returns their names."""
    env = dict(os.environ if environ is None else environ)
    if not (host_tracer_provider() is None if provider is None else created_here(provider)):
        return []
    added = []
    for name in requested_exporters(env):
        if ENV_PREFIX + name in added_processors(provider):
            continue
        factory = _processor(name, env)
        if factory is not None:
            add_span_processor_once(
                ENV_PREFIX + name,
                factory,
                create=False,
                provider=provider,
                private_only=provider is None,
            )
            added.append(name)
    return added
