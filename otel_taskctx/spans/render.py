"""A job's tree as text: one line per span (``manage.py taskctx_tree``, the viewer's text view)."""

from __future__ import annotations

from otel_taskctx.spans.tree import STATE_ERROR, SpanTree


def format_duration(ns: int | None) -> str:
    if ns is None:
        return "?"
    ms = ns / 1e6
    if ms < 1:
        return f"{ns / 1e3:.0f}µs"
    if ms < 1000:
        return f"{ms:.1f}ms"
    if ms < 60_000:
        return f"{ms / 1000:.2f}s"
    minutes, seconds = divmod(ms / 1000, 60)
    if minutes < 60:
        return f"{int(minutes)}m{seconds:02.0f}s"
    hours, minutes = divmod(minutes, 60)
    return f"{int(hours)}h{int(minutes):02d}m"


def render_text(tree: SpanTree, show_events: bool = False, max_indent: int = 40) -> list[str]:
    """One line per span: indented by depth, with its label, duration, status and task key."""
    lines = []
    for node in tree.nodes:
        depth = node.depth
        indent = "  " * min(depth, max_indent) + (f"[{depth}] " if depth > max_indent else "")
        end = node.end_ns if node.end_ns is not None else tree.now_ns
        duration = "" if node.placeholder else format_duration(end - node.start_ns)
        parts = [
            f"{indent}{node.name}",
            f'"{node.label}"' if node.label else "",
            f"[{node.kind.lower()}]" if not node.placeholder else "",
            duration,
            node.state.upper(),
        ]
        if node.task_key and (node.parent is None or node.parent.task_key != node.task_key):
            parts.append(f"task={node.task_key}")
        if node.descendants_count:
            parts.append(f"locked={node.descendants_count}")
        if node.mode == "fan_out":
            parts.append("fan-out")
        if node.process and (node.parent is None or node.parent.process != node.process):
            parts.append(f"{'worker' if node.worker else 'process'}={node.process}")
        line = " ".join(p for p in parts if p) + (" *" if node.critical else "")
        if node.status == STATE_ERROR and node.status_message:
            line += f" -- {node.status_message.splitlines()[0][:200]}"
        lines.append(line)
        if show_events:
            pad = "  " * min(depth, max_indent) + "    "
            for item in node.progress():
                lines.append(f"{pad}> progress: {item['message']}")
            for item in node.descendants():
                lines.append(f"{pad}> locked {item['count']} {item['model']}")
    return lines
