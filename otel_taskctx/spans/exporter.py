"""The span processors of the store (finished spans, running spans) and an exporter.

:class:`StoreSpanProcessor` (finished spans) and :class:`RunningSpanProcessor` (running spans)
are what ``install_span_store()`` puts on the tracer providers: both hand spans to the
process's :class:`~otel_taskctx.spans.writer.SpanWriter`, whose thread starts with the first
span of the process that uses it (never in a parent that forks workers) and batches the
writes. The running processor also has a job's spans written soon after its django-q2 run ends.
:class:`DatabaseSpanExporter` is the same store behind a processor of your choice (e.g. the
SDK's ``BatchSpanProcessor``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind

from otel_taskctx.spans import sqlite
from otel_taskctx.spans.flushing import flush_span_store_soon
from otel_taskctx.spans.rows import span_row
from otel_taskctx.spans.writer import SpanWriter, get_writer

log = logging.getLogger("otel_taskctx.spans")


class _Writing:
    """What the store's exporter and processor share: the writer (the process's, unless one
    was given), a flush that never raises into the caller, and a shutdown that flushes once."""

    def __init__(self, writer: SpanWriter | None = None) -> None:
        self._writer = writer
        self._shutdown = False

    @property
    def writer(self) -> SpanWriter:
        return self._writer or get_writer()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        try:
            if sqlite.caller_holds_transaction(self.writer.using):
                return True  # written once the caller commits
            return self.writer.flush(timeout_millis / 1000, running=False)
        except Exception:  # pragma: no cover
            return False

    def shutdown(self) -> None:
        if not self._shutdown:
            self._shutdown = True
            try:
                self.writer.flush(2.0, running=False)
            except Exception:  # pragma: no cover
                pass


class DatabaseSpanExporter(_Writing, SpanExporter):
    """Writes finished spans to :class:`~otel_taskctx.models.TaskSpan`.

    Use it behind a ``BatchSpanProcessor``. ``export`` never raises: rows that cannot be
    written are logged and dropped (and the export reports ``FAILURE``).
    """

    def __init__(self, writer: SpanWriter | None = None, timeout: float = 10.0) -> None:
        super().__init__(writer)
        self.timeout = timeout

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._shutdown:
            return SpanExportResult.FAILURE
        try:
            writer = self.writer
            max_len = writer.max_len()
            rows = []
            for span in spans:
                try:
                    row = span_row(span, max_len)
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
            if sqlite.caller_holds_transaction(writer.using):
                return SpanExportResult.SUCCESS  # written once the caller commits
            if request.done.wait(self.timeout) and request.ok:
                return SpanExportResult.SUCCESS
            return SpanExportResult.FAILURE
        except Exception:  # never into the caller
            log.warning("otel_taskctx span export failed", exc_info=True)
            return SpanExportResult.FAILURE


class StoreSpanProcessor(_Writing, SpanProcessor):
    """Hands each finished (sampled) span to the writer, noting the database it is for; the
    writer turns them into rows and writes them at its next pass (every ``interval``)."""

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if self._shutdown:
            return
        try:
            ctx = span.context
            if ctx is not None and ctx.trace_flags.sampled:
                self.writer.add_finished(span)
        except Exception:  # pragma: no cover - never into the caller
            log.debug("could not queue a span for the store", exc_info=True)


class RunningSpanProcessor(SpanProcessor):
    """Records spans when they start, so a running job shows up before it ends.

    Only spans still running ``running_delay`` seconds after they started get a row (written
    by the store's background writer); the finished span later completes that row.
    """

    def __init__(self, writer: SpanWriter | None = None) -> None:
        self._writer = writer

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

        This processor sits after the store's processor, so the run's own span is already
        queued. The write happens on a background thread (the job does not wait for
        the database); a worker recycled right after the job flushes on exit.
        """
        try:
            if span.kind is SpanKind.CONSUMER and (
                span.attributes.get("messaging.system") == "django_q2"
            ):
                flush_span_store_soon()
        except Exception:  # pragma: no cover - never into the caller
            log.debug("could not flush the span store", exc_info=True)

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        try:
            if sqlite.caller_holds_transaction(self.writer.using):
                return True
            return self.writer.flush(timeout_millis / 1000, running=True)
        except Exception:  # pragma: no cover
            return False
