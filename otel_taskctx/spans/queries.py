"""Reading job trees back from the span store (Django ORM)."""

from __future__ import annotations

import time
from typing import Any

from django.db.models import Count, Max, Min, Q, QuerySet, Sum

from otel_taskctx.span_models import LINKING_SPANS, TaskSpan
from otel_taskctx.spans.rows import LAUNCHED_TASK_KEY
from otel_taskctx.spans.tree import SPAN_FIELDS, SpanTree, build_tree, request_label

#: most spans loaded for one tree (the tree says when it was cut)
MAX_TREE_SPANS = 20_000
ROW_FIELDS = SPAN_FIELDS
STATUSES = ("running", "error", "ok")


def resolve_root_key(task_key: str, spans: QuerySet | None = None) -> str | None:
    """The root task key of the tree holding ``task_key`` (itself a root key or a nested one)."""
    spans = TaskSpan.objects.all() if spans is None else spans
    if spans.filter(root_task_key=task_key).exists():
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
    chain of spans above them in the same trace (the launching request, the job that launched
    this one).
    """
    spans = TaskSpan.objects.all() if spans is None else spans
    root_key = resolve_root_key(task_key, spans)
    if root_key is None:
        return None
    job_rows = list(
        spans.filter(root_task_key=root_key).order_by("start_ns").values(*ROW_FIELDS)[:max_spans]
    )
    if not job_rows:
        return None
    truncated = len(job_rows) >= max_spans
    others, cut = _linked_spans(job_rows, root_key, max(0, max_spans - len(job_rows)))
    rows = job_rows + _related(job_rows, others)
    return build_tree(
        rows, now_ns=time.time_ns(), root_task_key=root_key, truncated=truncated or cut
    )


#: rounds of lookups at most from a job to the jobs it launched (and theirs), or up to the job
#: that launched it (and the one above)
MAX_LINK_HOPS = 64


def _launched_key(row: dict[str, Any]) -> str | None:
    if row["kind"] != "PRODUCER" or not isinstance(row["attributes"], dict):
        return None
    key = row["attributes"].get(LAUNCHED_TASK_KEY)
    return str(key) if key else None


def _linked_spans(
    job_rows: list[dict[str, Any]], root_key: str, budget: int
) -> tuple[list[dict[str, Any]], bool]:
    """Spans outside the job that its tree may show (at most ``budget`` of them), and whether
    some were left out.

    Found through the indexes the span table has for it (none on every span's trace id: see
    :mod:`otel_taskctx.span_models`), hop by hop until nothing new turns up: in the traces
    seen, the spans outside any task and the enqueues (``LINKING_SPANS``); the trees of the
    jobs launched from the job's spans or from the spans below them (their enqueues name
    them), and of the jobs holding a span above them (the job that launched this one).
    :func:`_related` then keeps the ancestors and descendants among them.
    """
    found: dict[tuple[str, str], dict[str, Any]] = {}
    loaded = {root_key}
    seen_traces: set[str] = set()
    cut = False

    def add(rows: list[dict[str, Any]]) -> None:
        nonlocal budget, cut
        for row in rows:
            key = (row["trace_id"], row["span_id"])
            if key in found:
                continue
            if budget <= 0:
                cut = True
                return
            found[key] = row
            budget -= 1

    for _ in range(MAX_LINK_HOPS):
        traces = {r["trace_id"] for r in job_rows} | {r["trace_id"] for r in found.values()}
        if traces - seen_traces:
            query = (
                TaskSpan.objects.filter(LINKING_SPANS, trace_id__in=traces - seen_traces)
                .exclude(root_task_key=root_key)
                .order_by("start_ns")
            )
            add(list(query.values(*ROW_FIELDS)[: budget + 1]))
            seen_traces |= traces
        ancestors, descendants = _ancestry(job_rows, list(found.values()))
        roots = {r["root_task_key"] for r in ancestors if r["root_task_key"]}
        roots |= {k for k in map(_launched_key, (*job_rows, *descendants)) if k}
        roots -= loaded
        if not roots:
            roots = _jobs_of_broken_chains(job_rows, ancestors, found) - loaded
        if not roots or cut:
            break
        loaded |= roots
        query = TaskSpan.objects.filter(root_task_key__in=roots).order_by("start_ns")
        add(list(query.values(*ROW_FIELDS)[: budget + 1]))
    else:
        cut = True  # more hops than MAX_LINK_HOPS: the tree says it is incomplete
    return list(found.values()), cut


def _jobs_of_broken_chains(
    job_rows: list[dict[str, Any]],
    ancestors: list[dict[str, Any]],
    found: dict[tuple[str, str], dict[str, Any]],
) -> set[str]:
    """The jobs launched in a trace where the chain above the job stops at a span outside any
    task whose parent was not found: that parent may be a span of any job of the trace (a span
    started inside a job without its task's baggage). Entry spans (a request, a job run) have
    their parent in another process or service and do not count."""
    have = set(found) | {(r["trace_id"], r["span_id"]) for r in job_rows}
    traces = {
        r["trace_id"]
        for r in (*job_rows, *ancestors)
        if r["parent_span_id"]
        and (r["trace_id"], r["parent_span_id"]) not in have
        and r["root_task_key"] is None
        and r["kind"] not in ("SERVER", "CONSUMER")
    }
    if not traces:
        return set()
    return {k for r in found.values() if r["trace_id"] in traces and (k := _launched_key(r))}


def _related(job_rows: list[dict[str, Any]], others: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The spans of ``others`` above the job's spans (ancestors) or below them."""
    ancestors, descendants = _ancestry(job_rows, others)
    return ancestors + descendants


def _ancestry(
    job_rows: list[dict[str, Any]], others: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(ancestors, descendants)`` of the job's spans among ``others``."""
    if not others:
        return [], []
    by_key = {(r["trace_id"], r["span_id"]): r for r in others}
    job_keys = {(r["trace_id"], r["span_id"]) for r in job_rows}
    ancestors: dict[tuple[str, str], dict[str, Any]] = {}
    for row in job_rows:
        key = (row["trace_id"], row["parent_span_id"])
        while key[1] and key in by_key and key not in ancestors and key not in job_keys:
            parent = by_key[key]
            ancestors[key] = parent
            key = (parent["trace_id"], parent["parent_span_id"])
    children: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in others:
        if row["parent_span_id"]:
            children.setdefault((row["trace_id"], row["parent_span_id"]), []).append(row)
    descendants: list[dict[str, Any]] = []
    stack = list(job_keys)
    seen = set(job_keys) | set(ancestors)
    while stack:
        key = stack.pop()
        for child in children.get(key, ()):
            child_key = (child["trace_id"], child["span_id"])
            if child_key in seen:
                continue
            seen.add(child_key)
            descendants.append(child)
            stack.append(child_key)
    return list(ancestors.values()), descendants


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
    out = []
    for row in rows:
        row = dict(row)
        if row["errors"]:
            row["status"] = "error"
        elif row["running"]:
            row["status"] = "running"
        else:
            row["status"] = "ok"
        end = now_ns if row["running"] or row["last_end_ns"] is None else row["last_end_ns"]
        row["duration_ns"] = max(0, end - row["start_ns"])
        row["descendants"] = row["descendants"] or 0
        row["request"] = launching_request(row["root_task_key"], row["start_ns"])
        out.append(row)
    return out


def launching_request(root_key: str, start_ns: int | None = None, max_hops: int = 6) -> str | None:
    """Name of the request (server span) above the job's first span, if it was stored."""
    first = (
        TaskSpan.objects.filter(root_task_key=root_key)
        .order_by("start_ns")
        .values("trace_id", "parent_span_id", "root_task_key")
        .first()
    )
    if not first:
        return None
    trace_id, parent_id, hint = first["trace_id"], first["parent_span_id"], root_key
    for _ in range(max_hops):
        if not parent_id:
            return None
        parent = _span(trace_id, parent_id, hint)
        if parent is None:
            return None
        if parent["kind"] == "SERVER":
            from otel_taskctx.spans.tree import _node_from

            return request_label(_node_from(parent))
        parent_id, hint = parent["parent_span_id"], parent["root_task_key"] or hint
    return None


def _span(trace_id: str, span_id: str, root_hint: str | None) -> dict[str, Any] | None:
    """The stored span ``(trace_id, span_id)``: a linking span (outside any task, or an
    enqueue), else a span of the job tree ``root_hint``; None if neither has it."""
    found = (
        TaskSpan.objects.filter(LINKING_SPANS, trace_id=trace_id, span_id=span_id)
        .values(*ROW_FIELDS)
        .first()
    )
    if found is None and root_hint:
        found = (
            TaskSpan.objects.filter(root_task_key=root_hint, trace_id=trace_id, span_id=span_id)
            .values(*ROW_FIELDS)
            .first()
        )
    return found
