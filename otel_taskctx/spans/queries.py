"""Reading job trees back from the span store (Django ORM).

The span table's indexes lead with the hour a span started in (``start_hour``); lookups name
the stored hours to seek (docs/viewer.md, "Keys led by the hour").
"""

from __future__ import annotations

import time
from typing import Any

from django.db.models import Count, Max, Min, Q, QuerySet, Sum

from otel_taskctx.models import TaskSpan
from otel_taskctx.spans.build import build_tree
from otel_taskctx.spans.tree import SPAN_FIELDS, SpanTree, node_from, request_label

#: most spans loaded for one tree (the tree says when it was cut)
MAX_TREE_SPANS = 20_000
STATUSES = ("running", "error", "ok")
#: most hours a lookup seeks one by one (about 14 months); beyond, a range scan
MAX_SEEK_HOURS = 10_000


def stored_hours() -> range:
    """The hours (``start_hour``) from the table's oldest span to its newest: two seeks."""
    hours = TaskSpan.objects.order_by("start_hour").values_list("start_hour", flat=True)
    first = hours.first()
    if first is None:
        return range(0)
    return range(first, hours.reverse().first() + 1)


def in_hours(hours: range) -> Q:
    """A filter on ``start_hour`` the indexes can seek with: one seek per hour."""
    if len(hours) <= MAX_SEEK_HOURS:
        return Q(start_hour__in=list(hours))
    return Q(start_hour__gte=hours.start, start_hour__lt=hours.stop)


def of_tree(root_key: str, spans: QuerySet | None = None, hours: range | None = None) -> QuerySet:
    """The spans of the job tree ``root_key`` (an index seek per stored hour)."""
    spans = TaskSpan.objects.all() if spans is None else spans
    hours = stored_hours() if hours is None else hours
    return spans.filter(in_hours(hours), root_task_key=root_key)


def resolve_root_key(
    task_key: str, spans: QuerySet | None = None, hours: range | None = None
) -> str | None:
    """The root task key of the tree holding ``task_key`` (itself a root key or a nested one)."""
    spans = TaskSpan.objects.all() if spans is None else spans
    if of_tree(task_key, spans, hours).exists():
        return task_key
    row = (
        spans.filter(task_key=task_key).exclude(root_task_key=None).values("root_task_key").first()
    )
    return row["root_task_key"] if row else None


def load_tree(
    task_key: str, spans: QuerySet | None = None, max_spans: int = MAX_TREE_SPANS
) -> SpanTree | None:
    """The tree of the job ``task_key`` belongs to, or None when nothing was stored for it.

    It holds the job's spans, the spans below them (e.g. detached jobs they launched) and the
    chain of spans above them in the same trace (the launching request).
    """
    spans = TaskSpan.objects.all() if spans is None else spans
    hours = stored_hours()
    root_key = resolve_root_key(task_key, spans, hours)
    if root_key is None:
        return None
    job_rows = list(
        of_tree(root_key, spans, hours).order_by("start_ns").values(*SPAN_FIELDS)[:max_spans]
    )
    if not job_rows:
        return None
    truncated = len(job_rows) >= max_spans
    trace_ids = {r["trace_id"] for r in job_rows}
    budget = max(0, max_spans - len(job_rows))
    others = []
    if budget:
        others = list(
            TaskSpan.objects.filter(in_hours(hours), trace_id__in=trace_ids)
            .exclude(root_task_key=root_key)
            .order_by("start_ns")
            .values(*SPAN_FIELDS)[: budget + 1]
        )
        if len(others) > budget:
            truncated = True
            others = others[:budget]
    rows = job_rows + _related(job_rows, others)
    return build_tree(rows, now_ns=time.time_ns(), root_task_key=root_key, truncated=truncated)


def _related(job_rows: list[dict[str, Any]], others: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The spans of ``others`` above the job's spans (ancestors) or below them."""
    by_key = {(r["trace_id"], r["span_id"]): r for r in others}
    job_keys = {(r["trace_id"], r["span_id"]) for r in job_rows}
    keep: dict[tuple[str, str], dict[str, Any]] = {}
    for row in job_rows:  # ancestors
        key = (row["trace_id"], row["parent_span_id"])
        while key[1] and key in by_key and key not in keep and key not in job_keys:
            parent = by_key[key]
            keep[key] = parent
            key = (parent["trace_id"], parent["parent_span_id"])
    children: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in others:
        if row["parent_span_id"]:
            children.setdefault((row["trace_id"], row["parent_span_id"]), []).append(row)
    stack, seen = list(job_keys), set(job_keys)
    while stack:  # descendants
        for child in children.get(stack.pop(), ()):
            child_key = (child["trace_id"], child["span_id"])
            if child_key not in seen:
                seen.add(child_key)
                keep[child_key] = child
                stack.append(child_key)
    return list(keep.values())


def tree_summaries(
    spans: QuerySet | None = None, status: str | None = None, search: str | None = None
) -> QuerySet:
    """One row per job tree (newest first): start, last end, counts, status inputs, user."""
    spans = TaskSpan.objects.all() if spans is None else spans
    base = spans.exclude(root_task_key=None)
    if search:
        matching = TaskSpan.objects.filter(
            Q(task_key__icontains=search) | Q(root_task_key__icontains=search)
        ).values("root_task_key")
        base = base.filter(root_task_key__in=matching)
    rows = base.values("root_task_key").annotate(
        start_ns=Min("start_ns"),
        last_end_ns=Max("end_ns"),
        spans=Count("id"),
        running=Count("id", filter=Q(end_ns=None)),
        errors=Count("id", filter=Q(status=TaskSpan.STATUS_ERROR)),
        steps=Count("id", filter=Q(kind="INTERNAL")),
        descendants=Sum("descendants_count"),
        tasks=Count("task_key", distinct=True),
        user_id=Max("user_id"),
        user_label=Max("user_label"),
    )
    if status == "error":
        rows = rows.filter(errors__gt=0)
    elif status == "running":
        rows = rows.filter(running__gt=0, errors=0)
    elif status == "ok":
        rows = rows.filter(running=0, errors=0)
    return rows.order_by("-start_ns", "root_task_key")


def decorate_summaries(
    rows: list[dict[str, Any]], now_ns: int | None = None
) -> list[dict[str, Any]]:
    """Add status, duration and the launching request to summary rows (one page of them)."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    hours = stored_hours() if rows else range(0)
    out = []
    for row in rows:
        row = dict(row)
        row["status"] = "error" if row["errors"] else "running" if row["running"] else "ok"
        end = now_ns if row["running"] or row["last_end_ns"] is None else row["last_end_ns"]
        row["duration_ns"] = max(0, end - row["start_ns"])
        row["descendants"] = row["descendants"] or 0
        row["request"] = launching_request(row["root_task_key"], row["start_ns"], hours=hours)
        out.append(row)
    return out


def launching_request(
    root_key: str, start_ns: int | None = None, max_hops: int = 6, hours: range | None = None
) -> str | None:
    """Name of the request (server span) above the job's first span, if it was stored."""
    hours = stored_hours() if hours is None else hours
    first = (
        of_tree(root_key, hours=hours)
        .order_by("start_ns")
        .values("trace_id", "parent_span_id")
        .first()
    )
    if not first:
        return None
    trace_id, parent_id = first["trace_id"], first["parent_span_id"]
    for _ in range(max_hops):
        if not parent_id:
            return None
        parent = (
            TaskSpan.objects.filter(in_hours(hours), trace_id=trace_id, span_id=parent_id)
            .values(*SPAN_FIELDS)
            .first()
        )
        if parent is None:
            return None
        if parent["kind"] == "SERVER":
            return request_label(node_from(parent))
        parent_id = parent["parent_span_id"]
    return None
