"""``TaskContextSpanProcessor``: task lineage on every span started in a task, and the
descendants and progress a span carries forwarded to its task when it ends (docs/processor.md).

Needs ``opentelemetry-sdk`` (a ``SpanProcessor``); Django and powercrud are imported when
something is forwarded.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from otel_taskctx import semconv
from otel_taskctx.context import identity_from_context
from otel_taskctx.identity import TaskIdentity
from otel_taskctx.progress import progress_text

log = logging.getLogger("otel_taskctx.processor")

#: the name under which :func:`install_span_processor` adds the processor
PROCESSOR_NAME = "otel_taskctx.task_context"
#: spans started in a task and not ended yet that the processor remembers at most
MAX_OPEN_SPANS = 65536


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() == "true")


def span_items(span: ReadableSpan) -> list[tuple[str, Any]]:
    """What ``span`` asks to forward, in order: ``("descendants", (model, ids))`` and
    ``("progress", message)`` items, skipping those marked ``taskctx.forwarded``."""
    attrs: Mapping[str, Any] = span.attributes or {}
    if not span.events and not {semconv.DESCENDANTS_MODEL, semconv.PROGRESS_MESSAGE} & set(attrs):
        return []
    own = [] if _truthy(attrs.get(semconv.FORWARDED)) else [attrs]
    events = [(e.name, e.attributes or {}) for e in span.events or ()]
    events = [(name, ev) for name, ev in events if not _truthy(ev.get(semconv.FORWARDED))]
    # the span's own descendants first, then its events, its own progress last (its final word)
    sources = [(semconv.DESCENDANTS_EVENT, a) for a in own] + events
    items: list[tuple[str, Any]] = []
    for name, source in sources + [(semconv.PROGRESS_EVENT, a) for a in own]:
        if name == semconv.DESCENDANTS_EVENT:
            found = semconv.read_descendants(source)
            if found is not None and found[1]:
                items.append(("descendants", found[:2]))
        elif name == semconv.PROGRESS_EVENT and source.get(semconv.PROGRESS_MESSAGE) is not None:
            message = source[semconv.PROGRESS_MESSAGE]
            done, total = source.get(semconv.PROGRESS_DONE), source.get(semconv.PROGRESS_TOTAL)
            try:  # with ``(NN%)`` when done and total are valid
                items.append(("progress", progress_text(message, done, total)))
            except (TypeError, ValueError):
                log.debug("ignoring progress fraction %r/%r", done, total)
                items.append(("progress", str(message)))
    return items


class TaskContextSpanProcessor(SpanProcessor):
    """Stamps task lineage on spans (``stamp``) and forwards span-borne descendants and
    progress (``forward``); ``on_conflict(identity, exc)``: descendants held by another task
    (default: logged as an error; the span has ended, there is nothing to undo)."""

    def __init__(self, stamp: bool = True, forward: bool = True, on_conflict: Any = None) -> None:
        self.stamp = stamp
        self.forward = forward
        self.on_conflict = on_conflict
        # (trace id, span id) -> identity of spans started in a task and not ended yet
        self._started: dict[tuple[int, int], TaskIdentity] = {}
        self._lock = threading.Lock()

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        identity = identity_from_context(parent_context)
        if identity is None:
            return
        # (a span started with its task's lineage, as the worker's CONSUMER span is: kept)
        if self.stamp and (span.attributes or {}).get(semconv.TASK_KEY) != identity.task_key:
            span.set_attributes(identity.lineage_attributes())
        if self.forward:
            ctx = span.get_span_context()
            with self._lock:
                if len(self._started) >= MAX_OPEN_SPANS:  # spans that never end: drop oldest
                    for key in list(self._started)[: MAX_OPEN_SPANS // 10]:
                        del self._started[key]
                self._started[(ctx.trace_id, ctx.span_id)] = identity

    def on_end(self, span: ReadableSpan) -> None:
        if not self.forward:
            return
        ctx = span.context
        with self._lock:
            identity = self._started.pop((ctx.trace_id, ctx.span_id), None)
        for kind, payload in span_items(span) if identity is not None else ():
            self._forward(identity, kind, payload, span)

    def _forward(self, identity: TaskIdentity, kind: str, payload: Any, span: ReadableSpan) -> None:
        from otel_taskctx import descendants, progress
        from otel_taskctx.errors import DescendantConflict

        try:
            if kind == "descendants":
                model, ids = payload
                descendants.register_for(identity, {model: ids}, record_event=False)
            else:
                progress.report_for(identity, payload)
        except DescendantConflict as exc:
            if self.on_conflict is not None:
                self.on_conflict(identity, exc)
            else:
                log.error("span %r of task %s: %s", span.name, identity.task_key, exc)
        except Exception:
            log.exception(
                "span %r of task %s: could not forward %s", span.name, identity.task_key, kind
            )

    def shutdown(self) -> None:
        self.force_flush()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Write progress messages still waiting for their throttle interval."""
        from otel_taskctx.progress import flush_all_progress

        flush_all_progress()
        return True


def install_span_processor(create_provider: bool = False, **kwargs: Any) -> Any | None:
    """Add a :class:`TaskContextSpanProcessor` to the tracer providers otel_taskctx uses,
    once (``create_provider``: set up our private one now, not at our first span)."""
    from otel_taskctx.tracer_provider import add_span_processor_once

    return add_span_processor_once(
        PROCESSOR_NAME, lambda: TaskContextSpanProcessor(**kwargs), create=create_provider
    )
