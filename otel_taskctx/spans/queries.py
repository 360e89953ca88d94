"""Reading job trees back from the span store: rows (Django ORM) linked into a tree.

Building is pure Python, without recursion (trees thousands of levels deep are fine). Spans
arrive in any order, from several processes, some missing: a span whose parent was not recorded
hangs under a placeholder for it, attached by task lineage to a recorded span of its task when
there is one.

The span table's indexes lead with the hour a span started in (``start_hour``); lookups name
the stored hours to seek (docs/viewer.md, "Keys led by the hour").
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from django.db.models import Count, Max, Min, Q, QuerySet, Sum

from otel_taskctx import semconv
from otel_taskctx.models import TaskSpan
from otel_taskctx.spans.tree import (
    SPAN_FIELDS,
    STATE_ERROR,
    Node,
    SpanTree,
    node_from,
    request_label,
)

#: most spans loaded for one tree (the tree says when it was cut)
MAX_TREE_SPANS = 20_000
STATUSES = ("running", "error", "ok")
#: most hours a lookup seeks one by one (about 14 months); beyond, a range scan
MAX_SEEK_HOURS = 10_000


def stored_hours() -> range:
    """The hours (``start_hour``) from the table's oldest span to its newest: two seeks."""
    hours = TaskSpan.objects.order_by("start_hour").values_list("start_hour", flat=True)
    first = hours.first()
    return range(0) if first is None else range(first, hours.reverse().first() + 1)


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
    keys = spans.filter(task_key=task_key).exclude(root_task_key=None)
    return keys.values_list("root_task_key", flat=True).first()


def load_tree(
    task_key: str, spans: QuerySet | None = None, max_spans: int = MAX_TREE_SPANS
) -> SpanTree | None:
    """The tree of ``task_key``'s job (None if nothing was stored): its spans, the spans below
    them (detached jobs they launched) and the chain above them (the launching request)."""
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
        steps=Count("id", filter=Q(kind="INTERNAL") | Q(attributes__has_key=semconv.NESTED_MODE)),
        descendants=Sum("descendants_count"),
        tasks=Count("task_key", distinct=True),
        user_id=Max("user_id"),
        user_label=Max("user_label"),
    )
    ok, running = Q(running=0, errors=0), Q(running__gt=0, errors=0)
    rows = rows.filter({"error": Q(errors__gt=0), "running": running, "ok": ok}.get(status, Q()))
    return rows.order_by("-start_ns", "root_task_key")


def decorate_summaries(
    rows: list[dict[str, Any]], now_ns: int | None = None
) -> list[dict[str, Any]]:
    """Add status, duration and the launching request to summary rows (one page of them)."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    hours = stored_hours() if rows else range(0)
    out = [dict(row) for row in rows]
    for row in out:
        row["status"] = "error" if row["errors"] else "running" if row["running"] else "ok"
        end = now_ns if row["running"] or row["last_end_ns"] is None else row["last_end_ns"]
        row["duration_ns"] = max(0, end - row["start_ns"])
        row["descendants"] = row["descendants"] or 0
        row["request"] = launching_request(row["root_task_key"], hours)
    return out


def launching_request(root_key: str, hours: range | None = None) -> str | None:
    """Name of the request (the latest server span of the trace started before the job's
    first span, outside the job) that launched the job, if it was stored."""
    hours = stored_hours() if hours is None else hours
    first = of_tree(root_key, hours=hours).order_by("start_ns").values("trace_id", "start_ns")
    if (first := first.first()) is None:
        return None
    server = (
        TaskSpan.objects.filter(in_hours(hours), trace_id=first["trace_id"], kind="SERVER")
        .filter(start_ns__lte=first["start_ns"])
        .exclude(root_task_key=root_key)
        .order_by("-start_ns")
        .values(*SPAN_FIELDS)
        .first()
    )
    return request_label(node_from(server)) if server else None


def _placeholder_parent(ph: Node, by_task: dict[str, list[Node]]) -> Node | None:
    """A recorded span to hang a placeholder under, found by task lineage (or None)."""
    keys = []
    for child in ph.children:
        for key in (child.task_key, child.attributes.get(semconv.PARENT_TASK_KEY)):
            if key and key not in keys:
                keys.append(key)
    for key in keys:
        best = None
        for candidate in by_task.get(key, ()):
            if candidate.start_ns > ph.start_ns or candidate.trace_id != ph.trace_id:
                continue
            # prefer the worker run of the task, then the latest-starting span
            rank = (candidate.kind == "CONSUMER", candidate.start_ns)
            if best is None or rank > best[0]:
                node = candidate  # no cycles: not inside the placeholder's subtree
                while node is not None and node is not ph:
                    node = node.parent
                if node is None:
                    best = (rank, candidate)
        if best is not None:
            return best[1]
    return None


def build_tree(
    rows: Iterable[Mapping[str, Any] | Any],
    now_ns: int | None = None,
    root_task_key: str | None = None,
    truncated: bool = False,
) -> SpanTree:
    """Link ``rows`` (dicts or objects with the store's fields) into a :class:`SpanTree`; with
    ``root_task_key``, spans above the job's (the launching request) are its context."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    by_key: dict[tuple[str, str], Node] = {}
    for row in rows:
        node = node_from(row)
        if not node.span_id or not node.trace_id:
            continue
        key = (node.trace_id, node.span_id)
        seen = by_key.get(key)
        # duplicates (a running row and a finished one): the finished one wins
        if seen is None or (seen.end_ns is None and node.end_ns is not None):
            by_key[key] = node
    placeholders: dict[tuple[str, str], Node] = {}
    for node in by_key.values():
        pid = node.parent_span_id
        if not pid:
            continue
        parent = by_key.get((node.trace_id, pid))
        if parent is None:
            missing = Node(node.trace_id, pid, "", "(span not recorded)", placeholder=True)
            parent = placeholders.setdefault((node.trace_id, pid), missing)
            parent.start_ns = min(parent.start_ns or node.start_ns, node.start_ns)
        node.parent = parent
        parent.children.append(node)
    if placeholders:
        by_task: dict[str, list[Node]] = {}
        for node in by_key.values():
            if node.task_key:
                by_task.setdefault(node.task_key, []).append(node)
        for ph in sorted(placeholders.values(), key=lambda n: n.start_ns):
            for child in ph.children:
                if child.task_key and not ph.task_key:
                    ph.task_key, ph.root_task_key = child.task_key, child.root_task_key
            host = _placeholder_parent(ph, by_task)
            if host is not None:
                ph.parent = host
                host.children.append(ph)
    all_nodes = list(by_key.values()) + list(placeholders.values())
    roots = sorted(
        (n for n in all_nodes if n.parent is None), key=lambda n: (n.start_ns, n.span_id)
    )

    # pre-order walk: depth, ids, child order
    ordered: list[Node] = []
    used_ids: set[str] = set()
    stack = list(reversed(roots))
    while stack:
        node = stack.pop()
        node.children.sort(key=lambda n: (n.start_ns, n.span_id))
        node.depth = node.parent.depth + 1 if node.parent is not None else 0
        node.id = ("missing-" if node.placeholder else "") + node.span_id
        if node.id in used_ids:  # the same span id in another trace
            node.id += f"-{node.trace_id}"
        used_ids.add(node.id)
        ordered.append(node)
        stack.extend(reversed(node.children))

    # effective end = own end (now while running) or the latest end below it (post-order)
    for node in reversed(ordered):
        end = node.end_ns
        if end is None:
            end = node.start_ns if node.placeholder else now_ns
        node.effective_end = max([end, *(c.effective_end for c in node.children)])

    # job membership: spans of other tasks above the job are context
    for node in ordered if root_task_key is not None else ():  # pre-order: parents first
        node.context = not (
            node.root_task_key == root_task_key
            or (node.parent is not None and not node.parent.context)
            or (node.placeholder and any(c.root_task_key == root_task_key for c in node.children))
        )

    _mark_critical_path(roots)
    tree = SpanTree(
        nodes=ordered, roots=roots, now_ns=now_ns, root_task_key=root_task_key, truncated=truncated
    )
    _choose_target(tree)
    return tree


def _mark_critical_path(roots: list[Node]) -> None:
    """The chain of spans that decided when the tree finished (a span's end counts its
    descendants: work that outlives its parent stays on the path)."""
    if not roots:
        return
    top = max(roots, key=lambda n: n.effective_end)
    stack: list[tuple[Node, int]] = [(top, top.effective_end)]
    while stack:
        node, limit = stack.pop()
        node.critical = True
        cursor = min(node.effective_end, limit)
        for child in sorted(node.children, key=lambda c: c.effective_end, reverse=True):
            if cursor <= node.start_ns:
                break
            if child.start_ns >= cursor:
                continue
            stack.append((child, cursor))
            cursor = child.start_ns


def _choose_target(tree: SpanTree) -> None:
    nodes = tree.job_nodes or tree.nodes
    failed = [
        n
        for n in nodes
        if n.status == STATE_ERROR and not any(c.status == STATE_ERROR for c in n.children)
    ]
    if failed:
        tree.target = min(failed, key=lambda n: (n.start_ns, -n.depth))
        tree.target_reason = "failed"
        return
    running = [n for n in nodes if n.running and not any(c.running for c in n.children)]
    if running:
        tree.target = max(running, key=lambda n: (n.start_ns, n.depth))
        tree.target_reason = "running"
