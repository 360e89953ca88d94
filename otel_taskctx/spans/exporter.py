"""The span exporter (finished spans) and span processor (running spans) of the store."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind

from otel_taskctx.spans.writer import SpanWriter, get_writer

log = logging.getLogger("otel_taskctx.spans")


def caller_holds_sqlite_transaction(using: str | None = None) -> bool:
    """True when the calling thread is inside ``atomic()`` on an SQLite span database.

    Waiting for our writer there would wait for the caller's own write lock.
    """
    try:
        from django.db import connections, router

        from otel_taskctx.span_models import TaskSpan

        connection = connections[using or router.db_for_write(TaskSpan)]
        return connection.vendor == "sqlite" and connection.in_atomic_block
    except Exception:
        return False


class DatabaseSpanExporter(SpanExporter):
    """Writes finished spans to :class:`~otel_taskctx.span_models.TaskSpan`.

    Use it behind a ``BatchSpanProcessor``. ``export`` never raises: rows that cannot be
    written are logged and dropped (and the export reports ``FAILURE``).
    """

    def __init__(self, writer: SpanWriter | None = None, timeout: float = 10.0) -> None:
        self._writer = writer
        self.timeout = timeout
        self._shutdown = False

    @property
    def writer(self) -> SpanWriter:
        return self._writer or get_writer()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._shutdown:
            return SpanExportResult.FAILURE
        try:
            writer = self.writer
            max_len = writer.max_len()
            rows = []
            for span in spans:
                try:
                    row = _row(span, max_len)
                except Exception:
                    log.debug(
                        "could not convert span %r", getattr(span, "name", span), exc_info=True
                    )
                    continue
                if row is not None:
                    rows.append(row)
            if not rows:
                return SpanExportResult.SUCCESS
            request = writer.submit(rows)
            if caller_holds_sqlite_transaction(writer.using):
                return SpanExportResult.SUCCESS  # written once the caller commits
            if request.done.wait(self.timeout) and request.ok:
                return SpanExportResult.SUCCESS
            return SpanExportResult.FAILURE
        except Exception:  # never into the caller
            log.warning("otel_taskctx span export failed", exc_info=True)
            return SpanExportResult.FAILURE

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        if caller_holds_sqlite_transaction(self.writer.using):
            return True
        return self.writer.flush(timeout_millis / 1000, running=False)

    def shutdown(self) -> None:
        if not self._shutdown:
            self._shutdown = True
            try:
                self.writer.flush(2.0, running=False)
            except Exception:  # pragma: no cover
                pass


def _row(span: Any, max_len: int) -> dict[str, Any] | None:
    from otel_taskctx.spans.rows import span_row

    return span_row(span, max_len)


class RunningSpanProcessor(SpanProcessor):
    """Records spans when they start, so a running job shows up before it ends.

    Only spans still running ``running_delay`` seconds after they started get a row (written
    by the store's background writer); the finished span later completes that row.
    """

    def __init__(self, writer: SpanWriter | None = None) -> None:
        self._writer = writer
        self._flush_lock = threading.Lock()

    @property
    def writer(self) -> SpanWriter:
        return self._writer or get_writer()

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        try:
            ctx = span.context
            if ctx is not None and ctx.trace_flags.sampled:
                self.writer.track_running(span)
        except Exception:  # pragma: no cover - never into the caller
            log.debug("could not track a running span", exc_info=True)

    def on_end(self, span: ReadableSpan) -> None:
        """A django-q2 job run (CONSUMER span) ended: have its spans written now.

        This processor sits after the store's batch processor, so the run's own span is
        already queued. The write happens on a background thread (the job does not wait for
        the database); a worker recycled right after the job flushes on exit.
        """
        try:
            if span.kind is SpanKind.CONSUMER and (
                span.attributes.get("messaging.system") == "django_q2"
            ):
                from otel_taskctx.spans.install import flush_span_store_soon

                flush_span_store_soon()
        except Exception:  # pragma: no cover - never into the caller
            log.debug("could not flush the span store", exc_info=True)

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        try:
            if caller_holds_sqlite_transaction(self.writer.using):
                return True
            return self.writer.flush(timeout_millis / 1000, running=True)
        except Exception:  # pragma: no cover
            return False
