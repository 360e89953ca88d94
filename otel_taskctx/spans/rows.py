"""Turning SDK spans into bounded, JSON-safe rows for :class:`~otel_taskctx.models.TaskSpan`.

Every attribute value is cut to ``MAX_ATTRIBUTE_LENGTH`` characters (a sequence counts as one
value: its items share the budget) and a span's whole row has a size budget, so one huge
attribute or a flood of events cannot blow up the table.

A row names the process that made the span (``host:pid``). The process id comes from
:func:`current_pid`, cached and kept right across ``os.fork`` (django-q2 forks its workers), so
the per-span paths make no system call for it; the writer thread compares against it too, to
know it runs in a new process.
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
#: most events kept per span (first half and last half are kept when there are more)
MAX_EVENTS = 256
#: a row's attributes + events may hold about this many times ``max_len`` characters
ROW_BUDGET_FACTOR = 64

#: span attributes that name the user who launched a task (first match wins)
USER_ID_ATTRIBUTES = ("taskctx.user_id", "enduser.id", "user.id")
#: set by the instrumentation on the PRODUCER span of a job launched by a powercrud manager
LAUNCHED_TASK_KEY = "taskctx.launched_task_key"
USER_LABEL_ATTRIBUTES = ("taskctx.user", "taskctx.user_label", "user.name", "enduser.name")

_pid = os.getpid()
_process = f"{socket.gethostname()}:{_pid}"  # the row's label of this process


def _after_fork_in_child() -> None:
    global _pid, _process
    _pid = os.getpid()
    _process = f"{socket.gethostname()}:{_pid}"


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def current_pid() -> int:
    """``os.getpid()``, as of the last fork."""
    return _pid


_resource_cache: dict[int, tuple[Any, str, str]] = {}


def _resource_labels(resource: Any) -> tuple[str, str]:
    """``(service name, host:pid)`` of a span's resource (cached per resource object)."""
    pid = current_pid()
    cached = _resource_cache.get(id(resource))
    if cached is not None and cached[0] is resource and cached[2].endswith(f":{pid}"):
        return cached[1], cached[2]
    attrs = dict(resource.attributes) if resource is not None else {}
    service = str(attrs.get("service.name") or "")
    if "process.pid" in attrs:
        process = f"{attrs.get('host.name') or socket.gethostname()}:{attrs['process.pid']}"
        if attrs["process.pid"] != pid:
            return service, process  # not this process's resource: do not cache
    else:
        process = _process
    if len(_resource_cache) > 64:
        _resource_cache.clear()
    _resource_cache[id(resource)] = (resource, service, process)
    return service, process


def cut(text: str, max_len: int) -> str:
    """``text`` within ``max_len`` characters, without NUL (no database text column, nor
    PostgreSQL's jsonb, stores one)."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    if len(text) <= max_len:
        return text
    return text[: max(0, max_len - 1)] + TRUNCATION_MARK


def bound_value(value: Any, max_len: int) -> Any:
    """A JSON-safe copy of an attribute value of at most about ``max_len`` characters."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return cut(value, max_len)
    if isinstance(value, bytes):
        return cut(value.decode("utf-8", "replace"), max_len)
    if isinstance(value, Iterable) and not isinstance(value, Mapping):
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
    """A JSON-safe copy of ``attributes``: keys and values cut to size (see :func:`cut`)."""
    if not attributes:
        return {}
    for _ in range(3):  # a live span's attributes may change while we copy them
        try:
            items = list(attributes.items())
            break
        except (RuntimeError, KeyError):
            continue
    else:
        return {}
    out: dict[str, Any] = {}
    for key, value in items:
        # nearly every key and value is a short string or an int: taken as they are
        if type(key) is not str or len(key) > MAX_KEY_LENGTH or "\x00" in key:
            key = cut(str(key), MAX_KEY_LENGTH)
        kind = type(value)
        if kind is str:
            if len(value) > max_len or "\x00" in value:
                value = cut(value, max_len)
        elif kind is not int and kind is not bool:
            value = bound_value(value, max_len)
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


def _hex_trace(trace_id: int) -> str:
    return format(trace_id, "032x")


def _hex_span(span_id: int) -> str:
    return format(span_id, "016x")


def ns_to_datetime(ns: int) -> datetime:
    from django.conf import settings

    moment = datetime.fromtimestamp(ns / 1e9, tz=UTC)
    if getattr(settings, "USE_TZ", True):
        return moment
    from django.utils import timezone

    return timezone.make_naive(moment)


def _first(attrs: Mapping[str, Any], names: tuple[str, ...]) -> Any:
    for name in names:
        value = attrs.get(name)
        if value not in (None, ""):
            return value
    return None


def span_row(span: Any, max_len: int, running: bool = False) -> dict[str, Any] | None:
    """The column values for ``span`` (an SDK ``ReadableSpan``), or None if it has no context.

    With ``running`` the row describes a span that has not ended (no end, no status).
    """
    ctx = span.context
    if ctx is None or span.start_time is None:
        return None
    max_len = max(16, int(max_len))
    attrs = bound_attributes(span.attributes, max_len)
    events = []
    raw_events = list(span.events)
    dropped_events = 0
    if len(raw_events) > MAX_EVENTS:
        dropped_events = len(raw_events) - MAX_EVENTS
        half = MAX_EVENTS // 2
        raw_events = raw_events[:half] + raw_events[-half:]
    descendants = 0
    for event in raw_events:
        event_attrs = bound_attributes(event.attributes, max_len)
        event_attrs.pop(semconv.FORWARDED, None)
        if event.name == semconv.DESCENDANTS_EVENT:
            descendants += semconv.descendants_count(event_attrs)
        events.append(
            {
                "name": cut(str(event.name), MAX_NAME_LENGTH),
                "time_ns": int(event.timestamp),
                "attributes": event_attrs,
            }
        )
    count = attrs.get(semconv.DESCENDANTS_COUNT)
    if isinstance(count, int) and not isinstance(count, bool) and not descendants:
        descendants = count
    # keep the whole row within budget: drop events from the middle, then attribute values
    budget = max_len * ROW_BUDGET_FACTOR
    values = len(attrs) + sum(len(e["attributes"]) + 1 for e in events)
    # each value is bounded by max_len: only count characters when it could matter
    size = 0 if values * (max_len + MAX_KEY_LENGTH) <= budget else _size(attrs) + _size(events)
    while size > budget and events:
        removed = events.pop(len(events) // 2)
        dropped_events += 1
        size -= _size(removed)
    if size > budget:
        for key in sorted(attrs, key=lambda k: _size(attrs[k]), reverse=True):
            if size <= budget:
                break
            size -= _size(attrs[key])
            attrs[key] = TRUNCATION_MARK
    if dropped_events:
        attrs["taskctx.store.dropped_events"] = dropped_events
    links = []
    for link in list(span.links)[:32]:
        if link.context is None:
            continue
        links.append(
            {
                "trace_id": _hex_trace(link.context.trace_id),
                "span_id": _hex_span(link.context.span_id),
                "attributes": bound_attributes(link.attributes, max_len),
            }
        )
    service, process = _resource_labels(getattr(span, "resource", None))
    parent = span.parent
    user_id = _first(attrs, USER_ID_ATTRIBUTES)
    user_label = _first(attrs, USER_LABEL_ATTRIBUTES)
    task_key = attrs.get(semconv.TASK_KEY)
    root_key = attrs.get(semconv.ROOT_TASK_KEY) or task_key
    if not task_key and attrs.get(LAUNCHED_TASK_KEY):
        # the enqueue of a job (PRODUCER span outside any task) starts that job's tree
        task_key = root_key = attrs[LAUNCHED_TASK_KEY]
    if running:
        status, message, end_ns = "unset", "", None
    else:
        status = {"OK": "ok", "ERROR": "error"}.get(span.status.status_code.name, "unset")
        message = cut(span.status.description or "", max_len)
        end_ns = span.end_time
    return {
        "trace_id": _hex_trace(ctx.trace_id),
        "span_id": _hex_span(ctx.span_id),
        "parent_span_id": _hex_span(parent.span_id) if parent is not None else "",
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
        "service": cut(service, 255),
        "process": cut(process, 255),
    }
