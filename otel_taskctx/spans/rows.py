"""SDK spans as bounded, JSON-safe rows of :class:`~otel_taskctx.models.TaskSpan`.

Every attribute value is cut to ``MAX_ATTRIBUTE_LENGTH`` characters (a sequence's items share
the budget) and a row has an overall size budget, so one huge attribute or a flood of events
cannot blow up the table.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from otel_taskctx import semconv

TRUNCATION_MARK = "…"
MAX_KEY_LENGTH = 255
MAX_NAME_LENGTH = 255
#: most events kept per span (the first half and the last half when there are more)
MAX_EVENTS = 256
#: a row's attributes + events may hold about this many times ``max_len`` characters
ROW_BUDGET_FACTOR = 64
#: span attributes naming the user who launched a task, and their label (first match wins)
USER_ID_ATTRIBUTES = ("taskctx.user_id", "enduser.id", "user.id")
USER_LABEL_ATTRIBUTES = ("taskctx.user", "taskctx.user_label", "user.name", "enduser.name")
#: set by the instrumentation on the PRODUCER span of a job launched by a powercrud manager
LAUNCHED_TASK_KEY = "taskctx.launched_task_key"
_HOST = socket.gethostname()


def cut(text: str, max_len: int) -> str:
    """``text`` within ``max_len`` characters, NUL replaced (no text column stores one)."""
    text = text.replace("\x00", "\ufffd")
    return text if len(text) <= max_len else text[: max(0, max_len - 1)] + TRUNCATION_MARK


def bound_value(value: Any, max_len: int) -> Any:
    """A JSON-safe copy of an attribute value of at most about ``max_len`` characters."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, Iterable) and not isinstance(value, str | Mapping):
        out: list[Any] = []
        used = 0
        items = list(value)
        for index, item in enumerate(items):
            item = bound_value(item, max(1, max_len - used))
            used += len(item) if isinstance(item, str) else 8
            out.append(item)
            if used >= max_len and index + 1 < len(items):
                out.append(f"{TRUNCATION_MARK} {len(items) - index - 1} more")
                break
        return out
    return cut(str(value), max_len)


def bound_attributes(attributes: Mapping[str, Any] | None, max_len: int) -> dict[str, Any]:
    """A JSON-safe copy of ``attributes``, keys and values cut to size."""
    for _ in range(3):  # a running span's attributes may change while we copy them
        try:
            items = list((attributes or {}).items())
            break
        except (RuntimeError, KeyError):
            continue
    else:
        return {}
    out: dict[str, Any] = {}
    for key, value in items:
        if type(key) is not str or len(key) > MAX_KEY_LENGTH or "\x00" in key:
            key = cut(str(key), MAX_KEY_LENGTH)
        kind = type(value)  # nearly all are short strings or ints: taken as they are
        if kind is not int and kind is not bool and (kind is not str or len(value) > max_len):
            value = bound_value(value, max_len)
        elif kind is str and "\x00" in value:
            value = cut(value, max_len)
        out[key] = value
    return out


def _size(value: Any) -> int:
    if isinstance(value, str):
        return len(value) + 4
    if isinstance(value, dict):
        return sum(len(k) + _size(v) for k, v in value.items()) + 2
    if isinstance(value, list):
        return sum(_size(v) for v in value) + 2
    return 8


def ns_to_datetime(ns: int) -> datetime:
    from django.conf import settings
    from django.utils import timezone

    moment = datetime.fromtimestamp(ns / 1e9, tz=UTC)
    return moment if settings.USE_TZ else timezone.make_naive(moment)


def _first(attrs: Mapping[str, Any], names: tuple[str, ...]) -> Any:
    return next((attrs[n] for n in names if attrs.get(n) not in (None, "")), None)


def _events(span: Any, max_len: int) -> tuple[list[dict[str, Any]], int, int]:
    """The span's events as JSON (thinned to ``MAX_EVENTS``), how many were dropped, and the
    descendants they lock."""
    raw = list(span.events)
    dropped = max(0, len(raw) - MAX_EVENTS)
    if dropped:
        raw = raw[: MAX_EVENTS // 2] + raw[-MAX_EVENTS // 2 :]
    events, descendants = [], 0
    for event in raw:
        attrs = bound_attributes(event.attributes, max_len)
        attrs.pop(semconv.FORWARDED, None)
        if event.name == semconv.DESCENDANTS_EVENT:
            descendants += semconv.descendants_count(attrs)
        name = cut(str(event.name), MAX_NAME_LENGTH)
        events.append({"name": name, "time_ns": int(event.timestamp), "attributes": attrs})
    return events, dropped, descendants


def _within_budget(attrs: dict[str, Any], events: list[Any], max_len: int) -> int:
    """Drop events from the middle, then cut the largest values, until the row fits; returns
    how many events went."""
    budget = max_len * ROW_BUDGET_FACTOR
    values = len(attrs) + sum(len(e["attributes"]) + 1 for e in events)
    if values * (max_len + MAX_KEY_LENGTH) <= budget:  # each value is bounded: it fits
        return 0
    size, dropped = _size(attrs) + _size(events), 0
    while size > budget and events:
        size -= _size(events.pop(len(events) // 2))
        dropped += 1
    for key in sorted(attrs, key=lambda k: _size(attrs[k]), reverse=True):
        if size <= budget:
            break
        size -= _size(attrs[key])
        attrs[key] = TRUNCATION_MARK
    return dropped


def span_row(span: Any, max_len: int, running: bool = False) -> dict[str, Any] | None:
    """The column values for ``span`` (an SDK span; ``running``: as not ended yet), or None
    if it has no context."""
    ctx = span.context
    if ctx is None or span.start_time is None:
        return None
    max_len = max(16, int(max_len))
    attrs = bound_attributes(span.attributes, max_len)
    events, dropped, descendants = _events(span, max_len)
    dropped += _within_budget(attrs, events, max_len)
    if dropped:
        attrs["taskctx.store.dropped_events"] = dropped
    count = attrs.get(semconv.DESCENDANTS_COUNT)
    if type(count) is int and not descendants:
        descendants = count
    links = [
        {
            "trace_id": format(link.context.trace_id, "032x"),
            "span_id": format(link.context.span_id, "016x"),
            "attributes": bound_attributes(link.attributes, max_len),
        }
        for link in list(span.links)[:32]
        if link.context is not None
    ]
    resource = getattr(span, "resource", None)
    resource_attrs = resource.attributes if resource is not None else {}
    pid = resource_attrs.get("process.pid") or os.getpid()
    task_key = attrs.get(semconv.TASK_KEY)
    root_key = attrs.get(semconv.ROOT_TASK_KEY) or task_key
    if not task_key and attrs.get(LAUNCHED_TASK_KEY):
        # the enqueue of a job (PRODUCER span outside any task) starts that job's tree
        task_key = root_key = attrs[LAUNCHED_TASK_KEY]
    status, message, end_ns = "unset", "", None
    if not running:
        status = {"OK": "ok", "ERROR": "error"}.get(span.status.status_code.name, "unset")
        message = cut(span.status.description or "", max_len)
        end_ns = span.end_time
    user_id, user_label = _first(attrs, USER_ID_ATTRIBUTES), _first(attrs, USER_LABEL_ATTRIBUTES)
    return {
        "trace_id": format(ctx.trace_id, "032x"),
        "span_id": format(ctx.span_id, "016x"),
        "parent_span_id": format(span.parent.span_id, "016x") if span.parent else "",
        "name": cut(str(span.name), MAX_NAME_LENGTH),
        "kind": span.kind.name,
        "start_ns": int(span.start_time),
        "end_ns": int(end_ns) if end_ns is not None else None,
        "started_at": ns_to_datetime(span.start_time),
        "status": status,
        "status_message": message,
        "attributes": attrs,
        "events": events,
        "links": links,
        "task_key": cut(str(task_key), 200) if task_key else None,
        "root_task_key": cut(str(root_key), 200) if root_key else None,
        "user_id": cut(str(user_id), 150) if user_id is not None else None,
        "user_label": cut(str(user_label), 255) if user_label is not None else "",
        "descendants_count": descendants,
        "manager": cut(str(attrs.get(semconv.MANAGER_CLASS_PATH) or ""), 255),
        "service": cut(str(resource_attrs.get("service.name") or ""), 255),
        "process": cut(f"{resource_attrs.get('host.name') or _HOST}:{pid}", 255),
    }
