"""Building a job's tree from stored spans (pure Python: no database, no recursion).

Spans arrive in any order, from several processes, some missing: a span whose parent was not
recorded hangs under a placeholder for it, attached by task lineage to a recorded span of its
task when there is one. Every walk is iterative (trees thousands of levels deep are fine).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from otel_taskctx import semconv
from otel_taskctx.spans.tree import STATE_ERROR, Node, SpanTree, node_from


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
    """Link ``rows`` (dicts or objects with the span store's fields) into a :class:`SpanTree`.

    With ``root_task_key``, spans of other tasks are marked as context (e.g. the launching
    request) unless they are descendants of the job's spans (detached jobs it started).
    """
    now_ns = time.time_ns() if now_ns is None else now_ns
    by_key: dict[tuple[str, str], Node] = {}
    for row in rows:
        node = node_from(row)
        if not node.span_id or not node.trace_id:
            continue
        seen = by_key.get(node.key)
        # duplicates (a running row and a finished one): the finished one wins
        if seen is None or (seen.end_ns is None and node.end_ns is not None):
            by_key[node.key] = node
    placeholders: dict[tuple[str, str], Node] = {}
    for node in by_key.values():
        pid = node.parent_span_id
        if not pid:
            continue
        parent = by_key.get((node.trace_id, pid))
        if parent is None:
            parent = placeholders.get((node.trace_id, pid))
            if parent is None:
                name = "(span not recorded)"
                parent = Node(
                    node.trace_id, pid, "", name, placeholder=True, start_ns=node.start_ns
                )
                placeholders[(node.trace_id, pid)] = parent
            parent.start_ns = min(parent.start_ns, node.start_ns)
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
        base = ("missing-" if node.placeholder else "") + node.span_id
        node_id = base
        if node_id in used_ids:
            node_id = f"{base}-{node.trace_id[:8]}"
            n = 2
            while node_id in used_ids:
                node_id, n = f"{base}-{node.trace_id[:8]}-{n}", n + 1
        used_ids.add(node_id)
        node.id = node_id
        ordered.append(node)
        stack.extend(reversed(node.children))

    # effective end = own end (now while running) or the latest end below it (post-order)
    for node in reversed(ordered):
        end = node.end_ns
        if end is None:
            end = node.start_ns if node.placeholder else now_ns
        node.effective_end = max([end, *(c.effective_end for c in node.children)])

    # job membership: spans of other tasks above the job are context
    if root_task_key is not None:
        in_job: set[int] = set()
        for node in ordered:  # pre-order: parents first
            if (
                node.root_task_key == root_task_key
                or (node.parent is not None and id(node.parent) in in_job)
                or (
                    node.placeholder
                    and any(c.root_task_key == root_task_key for c in node.children)
                )
            ):
                in_job.add(id(node))
        for node in ordered:
            node.context = id(node) not in in_job

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
