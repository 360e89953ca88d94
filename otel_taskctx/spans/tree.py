"""A job's tree of stored spans and its JSON (built by :func:`~.queries.build_tree`).

A :class:`Node` is one stored span (or a placeholder for a parent that was not recorded); a
:class:`SpanTree` is a job's forest with its critical path and its target, where to look first
(the deepest failed span, else the deepest running one).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from otel_taskctx import semconv

#: how Celery names a process that is no worker (``gen<pid>@host``): the publisher's name that
#: opentelemetry-instrumentation-celery copies from a message's ``origin`` header
ANONYMOUS_NODE = re.compile(r"gen\d+@")

STATE_OK = "ok"
STATE_UNSET = "unset"
STATE_ERROR = "error"
STATE_RUNNING = "running"
STATE_MISSING = "missing"
ERROR_KEYS = ("type", "message", "stacktrace")


@dataclass(eq=False, slots=True)
class Node:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: str = "INTERNAL"
    start_ns: int = 0
    end_ns: int | None = None
    status: str = STATE_UNSET
    status_message: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    links: list[dict[str, Any]] = field(default_factory=list)
    task_key: str | None = None
    root_task_key: str | None = None
    user_id: str | None = None
    user_label: str = ""
    descendants_count: int = 0
    service: str = ""
    process: str = ""
    manager: str = ""
    placeholder: bool = False
    context: bool = False  # an ancestor outside the job (e.g. the launching request)
    id: str = ""
    parent: Node | None = None
    children: list[Node] = field(default_factory=list)
    depth: int = 0
    effective_end: int = 0
    critical: bool = False

    @property
    def running(self) -> bool:
        return self.end_ns is None and not self.placeholder

    @property
    def mode(self) -> str:
        """How a nested step ran: "inline", "fan_out" (a child job of its own), or ""."""
        return str(self.attributes.get(semconv.NESTED_MODE) or "")

    @property
    def label(self) -> str:
        """What the span worked on (its ``taskctx.label``), or ""."""
        return str(self.attributes.get(semconv.LABEL) or "")

    @property
    def worker(self) -> str:
        """Who ran a job's run in another process than its parent span's, or any fanned-out
        child's run: Celery's name of the worker (``taskctx.worker``), else the process
        (``host:pid``); else ""."""
        if self.kind != "CONSUMER" or not self.process:
            return ""
        parent = self.parent
        if not (parent is None or parent.process != self.process or self.mode == "fan_out"):
            return ""
        return celery_worker(self.attributes) or self.process

    @property
    def state(self) -> str:
        if self.placeholder:
            return STATE_MISSING
        if self.status == STATE_ERROR:
            return STATE_ERROR
        if self.end_ns is None:
            return STATE_RUNNING
        return STATE_OK if self.status in (STATE_OK, STATE_UNSET) else self.status

    def errors(self) -> list[dict[str, str]]:
        out = []
        for event in self.events:
            if event.get("name") == "exception":
                attrs = event.get("attributes") or {}
                out.append({k: str(attrs.get(f"exception.{k}", "")) for k in ERROR_KEYS})
        message = self.status_message
        if self.status == STATE_ERROR and (
            not out
            or (message and not any(message.endswith(e["message"]) for e in out if e["message"]))
        ):
            out.insert(0, {"type": "", "message": message, "stacktrace": ""})
        return out

    def _events(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        return [
            (e.get("attributes") or {}, e.get("time_ns"))
            for e in self.events
            if e.get("name") == name
        ]

    def descendants(self) -> list[dict[str, Any]]:
        found = [
            (semconv.read_descendants(attrs), at)
            for attrs, at in self._events(semconv.DESCENDANTS_EVENT)
        ]
        if not any(f for f, _ in found):
            own = semconv.read_descendants(self.attributes)
            if own is not None:
                own = (own[0], own[1], self.descendants_count or own[2])
            found = [(own, self.start_ns)]
        return [
            {"model": f[0], "count": f[2], "ids": f[1][:50], "time_ns": at}
            for f, at in found
            if f is not None
        ]

    def progress(self) -> list[dict[str, Any]]:
        out = [
            {"time_ns": at or self.start_ns, "message": str(a.get(semconv.PROGRESS_MESSAGE, ""))}
            for a, at in self._events(semconv.PROGRESS_EVENT)
        ]
        message = self.attributes.get(semconv.PROGRESS_MESSAGE)
        if not out and isinstance(message, str):
            out.append({"time_ns": self.end_ns or self.start_ns, "message": message})
        return out


#: a node's fields in the viewer's JSON as they are
NODE_JSON_FIELDS = (
    "id span_id trace_id depth name kind state start_ns end_ns critical placeholder context"
    " task_key process worker mode service status_message descendants_count attributes events"
    " links"
).split()
#: the stored span fields a tree is built from (the first fields of a Node)
SPAN_FIELDS = tuple(f.name for f in fields(Node))[:20]


def node_from(row: Mapping[str, Any] | Any) -> Node:
    get = row.get if isinstance(row, Mapping) else (lambda k: getattr(row, k, None))
    kwargs = {name: get(name) for name in SPAN_FIELDS}
    kwargs = {k: v for k, v in kwargs.items() if v is not None or k == "end_ns"}
    return Node(**{"parent_span_id": "", "name": "", **kwargs})


def celery_worker(attributes: Mapping[str, Any]) -> str:
    """The Celery worker's name (``name@host``) in a run's attributes, or ""."""
    name = attributes.get(semconv.WORKER) or attributes.get(semconv.CELERY_HOSTNAME)
    if not isinstance(name, str) or "@" not in name or ANONYMOUS_NODE.match(name):
        return ""
    return name


def request_label(node: Node) -> str:
    attrs = node.attributes
    method = attrs.get("http.request.method") or attrs.get("http.method")
    names = ("http.route", "url.path", "http.target", "http.url")
    target = next((attrs[n] for n in names if attrs.get(n)), None)
    if method and target and str(target) not in node.name:
        return f"{method} {target}"
    return node.name


@dataclass
class SpanTree:
    """A forest of spans with its critical path and where to look first."""

    nodes: list[Node]  # depth-first pre-order
    roots: list[Node]
    now_ns: int
    root_task_key: str | None = None
    target: Node | None = None
    target_reason: str = ""
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def job_nodes(self) -> list[Node]:
        return [n for n in self.nodes if not n.context]

    @property
    def _job(self) -> list[Node]:
        return self.job_nodes or self.nodes

    @property
    def start_ns(self) -> int:
        return min((n.start_ns for n in self._job), default=0)

    @property
    def axis_start_ns(self) -> int:
        return min((n.start_ns for n in self.nodes), default=0)

    @property
    def end_ns(self) -> int | None:
        """When the job ended (None while some span still runs)."""
        if any(n.running for n in self._job):
            return None
        return max((n.effective_end for n in self._job), default=None)

    @property
    def axis_end_ns(self) -> int:
        return max((n.effective_end for n in self.nodes), default=0)

    @property
    def status(self) -> str:
        if any(n.status == STATE_ERROR for n in self._job):
            return STATE_ERROR
        return STATE_RUNNING if any(n.running for n in self._job) else STATE_OK

    @property
    def duration_ns(self) -> int:
        end = max((n.effective_end for n in self._job), default=self.start_ns)
        return max(0, end - self.start_ns)

    @property
    def critical_path(self) -> list[Node]:
        return [n for n in self.nodes if n.critical]

    @property
    def expand(self) -> list[Node]:
        """The nodes to open: the ancestors of the target and of every fanned-out child's run,
        and a running target itself when it has children (the steps it has done so far)."""
        path = set()
        for node in [*(n for n in self.nodes if n.mode == "fan_out"), self.target]:
            while node is not None and node.parent is not None:
                node = node.parent
                path.add(node)
        if self.target is not None and self.target.running and self.target.children:
            path.add(self.target)
        return [n for n in self.nodes if n in path]

    @property
    def target_path(self) -> list[str]:
        """Names of the steps down to the target: the target and the INTERNAL spans of the
        job above it, up to the job's run (``["Book.save", "sync chapters"]``)."""
        if self.target is None:
            return []
        names = [self.target.name]
        node = self.target.parent
        while node and node.kind == "INTERNAL" and not node.context and not node.placeholder:
            names.append(node.name)
            node = node.parent
        return names[::-1]

    def find(self, span_id: str) -> Node | None:
        return next((n for n in self.nodes if span_id in (n.span_id, n.id)), None)

    def progress(self) -> list[dict[str, Any]]:
        out = [
            {**item, "node": n.id, "span": n.name, "label": n.label, "task_key": n.task_key}
            for n in self.nodes
            for item in n.progress()
        ]
        return sorted(out, key=lambda p: p["time_ns"] or 0)

    def summary(self) -> dict[str, Any]:
        nodes = self._job
        user_id = next((n.user_id for n in nodes if n.user_id), None)
        user_label = next((n.user_label for n in nodes if n.user_label), "")
        servers = (n for n in self.nodes if n.context and n.kind == "SERVER")
        request = next((request_label(n) for n in servers), None)
        steps = sum(1 for n in nodes if n.mode or (n.kind == "INTERNAL" and not n.placeholder))
        return {
            "root_task_key": self.root_task_key,
            "status": self.status,
            "start_ns": self.start_ns,
            "end_ns": self.end_ns,
            "duration_ms": round(self.duration_ns / 1e6, 3),
            "spans": len(nodes),
            "nested_steps": steps,
            "descendants_locked": sum(n.descendants_count for n in nodes),
            "tasks": len({n.task_key for n in nodes if n.task_key}),
            "processes": sorted({n.process for n in nodes if n.process}),
            "trace_ids": sorted({n.trace_id for n in self.nodes}),
            "user_id": user_id,
            "user_label": user_label,
            "request": request,
            "missing_spans": sum(1 for n in self.nodes if n.placeholder),
        }

    def to_dict(self) -> dict[str, Any]:
        axis_start = self.axis_start_ns

        def ms(ns: int) -> float:
            return round(ns / 1e6, 3)

        out_nodes = []
        for node in self.nodes:
            end = node.end_ns if node.end_ns is not None else self.now_ns
            item = {name: getattr(node, name) for name in NODE_JSON_FIELDS}
            item.update(
                parent=node.parent.id if node.parent is not None else None,
                children=[c.id for c in node.children],
                offset_ms=ms(node.start_ns - axis_start),
                duration_ms=ms(end - node.start_ns),
                subtree_end_ms=ms(node.effective_end - axis_start),
                errors=node.errors(),
                descendants=node.descendants(),
                progress=node.progress(),
            )
            out_nodes.append(item)
        return {
            **self.summary(),
            "now_ns": self.now_ns,
            "axis_start_ns": axis_start,
            "axis_ms": ms(max(0, self.axis_end_ns - axis_start)),
            "roots": [r.id for r in self.roots],
            "target": self.target.id if self.target is not None else None,
            "target_reason": self.target_reason,
            "expand": [n.id for n in self.expand],
            "target_path": self.target_path,
            "critical_path": [n.id for n in self.critical_path],
            "progress": self.progress(),
            "truncated": self.truncated,
            "nodes": out_nodes,
        }
