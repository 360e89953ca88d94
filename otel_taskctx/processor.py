"""``TaskContextSpanProcessor``: task lineage on every span, span-borne locks and progress.

For every span that starts inside a task (a verified identity in the span's parent context)
the processor

* stamps the lineage attributes ``taskctx.task_key``, ``taskctx.root_task_key``,
  ``taskctx.depth`` (and ``taskctx.parent_task_key``, ``taskctx.manager_class_path``), so a
  trace backend finds a whole job tree by task key;
* when the span ends, forwards what the span carries under the convention of
  :mod:`otel_taskctx.semconv` to the task that was current when the span started:

  - descendants: an event ``taskctx.descendants`` (or span attributes) with
    ``taskctx.descendants.model`` (``"app_label.ModelName"``) and ``taskctx.descendants.ids``
    (a list of ids) are reserved in the conflict store under the task key;
  - progress: an event ``taskctx.progress`` with attribute ``taskctx.progress`` (or the span
    attribute ``taskctx.progress``) becomes the task's progress (throttled, see
    :func:`otel_taskctx.report_progress`); with ``taskctx.progress.done`` and
    ``taskctx.progress.total`` it ends in ``(NN%)`` (:mod:`otel_taskctx.progress`).

  Items marked ``taskctx.forwarded = True`` (on the event, or on the span for span
  attributes) were already forwarded by :func:`otel_taskctx.register_descendants` /
  :func:`otel_taskctx.report_progress` and are skipped.

The processor is a convenience for code that only speaks the OpenTelemetry API; it cannot be
the lock path. Processors only see *recording* spans: a span dropped by the sampler never
reaches ``on_start``/``on_end``, and ``on_end`` runs after the work the span describes. The
helpers therefore lock and report directly, whatever the tracing configuration.

This module imports only the OpenTelemetry API and SDK; Django and powercrud are imported
when something has to be forwarded.
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

#: the name under which :func:`install_span_processor` adds the processor (once)
PROCESSOR_NAME = "otel_taskctx.task_context"
#: spans started in a task and not ended yet that the processor remembers at most
MAX_OPEN_SPANS = 65536


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() == "true")


def span_items(span: ReadableSpan) -> list[tuple[str, Any]]:
    """What ``span`` asks to forward, in order: ``("descendants", (model, ids))`` and
    ``("progress", message)`` items, skipping those marked ``taskctx.forwarded``."""
    items: list[tuple[str, Any]] = []
    attrs: Mapping[str, Any] = span.attributes or {}
    events = span.events
    if (
        not events
        and semconv.DESCENDANTS_MODEL not in attrs
        and semconv.PROGRESS_MESSAGE not in attrs
    ):
        return items
    if not _truthy(attrs.get(semconv.FORWARDED)):
        _add_descendants(items, attrs)
    for event in events or ():
        ev: Mapping[str, Any] = event.attributes or {}
        if _truthy(ev.get(semconv.FORWARDED)):
            continue
        if event.name == semconv.DESCENDANTS_EVENT:
            _add_descendants(items, ev)
        elif event.name == semconv.PROGRESS_EVENT:
            message = ev.get(semconv.PROGRESS_MESSAGE)
            if message is not None:
                items.append(("progress", _progress(message, ev)))
    if not _truthy(attrs.get(semconv.FORWARDED)):
        message = attrs.get(semconv.PROGRESS_MESSAGE)
        if message is not None:
            items.append(("progress", _progress(message, attrs)))  # the span's final word
    return items


def _progress(message: Any, attrs: Mapping[str, Any]) -> str:
    """The message, with ``(NN%)`` when ``taskctx.progress.done``/``.total`` are valid."""
    done, total = attrs.get(semconv.PROGRESS_DONE), attrs.get(semconv.PROGRESS_TOTAL)
    try:
        return progress_text(message, done, total)
    except (TypeError, ValueError):
        log.debug("ignoring progress fraction %r/%r", done, total)
        return str(message)


def _lineage_missing(span: Span, identity: TaskIdentity) -> bool:
    """False when the span was started with this task's lineage already (the worker's
    CONSUMER span is): no second pass over the same attributes."""
    attributes = span.attributes
    return attributes is None or attributes.get(semconv.TASK_KEY) != identity.task_key


def _add_descendants(items: list[tuple[str, Any]], attributes: Mapping[str, Any]) -> None:
    found = semconv.read_descendants(attributes)
    if found is not None and found[1]:
        items.append(("descendants", (found[0], found[1])))


class TaskContextSpanProcessor(SpanProcessor):
    """Stamps task lineage on spans and forwards span-borne descendants and progress.

    ``stamp=False`` turns off the lineage attributes, ``forward=False`` the forwarding.
    ``on_conflict(identity, exc)`` is called when span-borne descendants are held by another
    task (default: logged as an error; the span has ended, there is nothing to undo).
    """

    def __init__(
        self,
        stamp: bool = True,
        forward: bool = True,
        on_conflict: Any = None,
    ) -> None:
        self.stamp = stamp
        self.forward = forward
        self.on_conflict = on_conflict
        # (trace id, span id) -> identity of spans started in a task and not ended yet. on_end
        # receives a read-only copy of the span, so the span context is the key.
        self._started: dict[tuple[int, int], TaskIdentity] = {}
        self._lock = threading.Lock()

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        try:
            identity = identity_from_context(parent_context)
        except Exception:  # pragma: no cover - never break span creation
            log.debug("could not read the task identity", exc_info=True)
            return
        if identity is None:
            return
        if self.stamp and _lineage_missing(span, identity):
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
        if ctx is None:  # pragma: no cover - not an SDK span
            return
        with self._lock:
            identity = self._started.pop((ctx.trace_id, ctx.span_id), None)
        if identity is None:
            return
        try:
            items = span_items(span)
        except Exception:  # pragma: no cover - malformed attributes
            log.warning("could not read taskctx items of span %s", span.name, exc_info=True)
            return
        for kind, payload in items:
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
        try:
            from otel_taskctx.progress import flush_all_progress

            flush_all_progress()
        except Exception:  # pragma: no cover - Django not configured
            log.debug("could not flush progress", exc_info=True)
        return True


def install_span_processor(create_provider: bool = False, **kwargs: Any) -> Any | None:
    """Add a :class:`TaskContextSpanProcessor` to the tracer providers otel_taskctx uses (once).

    It joins the host's SDK provider (configured now or set later, see
    :mod:`otel_taskctx.tracer_provider`) and otel_taskctx's private one; it never sets a
    global provider and never replaces exporters, processors or the sampler
    (``create_provider=True``: set up the private provider now rather than at our first span).
    Returns the processor, or None when the OpenTelemetry SDK is missing.
    """
    from otel_taskctx.tracer_provider import add_span_processor_once

    return add_span_processor_once(
        PROCESSOR_NAME, lambda: TaskContextSpanProcessor(**kwargs), create=create_provider
    )
