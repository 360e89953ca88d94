"""The verdict on a job and how it is shown: the facts table, the span tree, the JSON report."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from sample.library.demo.records import JobReport


def terminal_console(out: Any) -> Console:
    """The console a demo command prints to: the terminal's width, or ``COLUMNS`` (110) when
    the output is not a terminal (a test, a log file)."""
    width = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", "110"))
    return Console(file=out, width=width, highlight=False, soft_wrap=False)


def judge(report: JobReport) -> None:
    """Every check of a finished job; a failed one is a line in ``report.failures``."""
    f = report.failures
    if report.status != "success":
        f.append(f"the job did not succeed: {report.status}")
    if report.parents_updated != report.parents:
        f.append(f"only {report.parents_updated}/{report.parents} parents were updated")
    if report.descendants_inline != report.descendants:
        f.append(
            f"only {report.descendants_inline}/{report.descendants} descendants were "
            f"updated inside the job ({report.descendants_late} later, by other jobs)"
        )
    if report.escaped_queued or report.escaped_tasks:
        f.append(
            f"nested jobs escaped to the queue: {report.escaped_queued} queued, "
            f"{report.escaped_tasks} run separately ({', '.join(report.escaped_names)})"
        )
    if report.locks_peak < report.parents:
        f.append(f"the job held {report.locks_peak} locks, fewer than its {report.parents} parents")
    if report.descendants and not report.locks_peak_by_model.get(report.child_label):
        f.append("no descendant was ever locked under the job's key")
    if report.locks_foreign:
        f.append(f"{report.locks_foreign} of the job's objects were locked by another task")
    if report.locks_left:
        f.append(f"{report.locks_left} locks were still held after the job ended")
    if report.dashboard_status and report.dashboard_status not in {"success", "failed"}:
        f.append(f"powercrud's dashboard still shows the ended job as {report.dashboard_status!r}")
    if report.dashboard_progress and not report.dashboard_progress.startswith(FINAL_MESSAGES):
        f.append(
            "the ended job's last progress message is not powercrud's own final one: "
            f"{report.dashboard_progress!r} (a held message landed after it)"
        )
    if report.progress_left is not None:
        f.append(
            "the job's progress key was still set 5s after it ended "
            f"({report.progress_left!r}): powercrud's progress view never reports completion"
        )
    for refusal in report.refusals:
        if refusal.ids and not refusal.refused:
            f.append(f"{refusal.what} was not refused: {refusal.message}")
    report.ok = not f


#: how powercrud's bulk tasks start their last progress message
FINAL_MESSAGES = ("completed update", "completed delete", "failed update", "failed delete")


def print_report(console: Console, report: JobReport, tree: Any = None) -> None:
    """The facts of a job as a table, then its span tree and its failures."""
    table = Table(box=box.SIMPLE, show_header=False, pad_edge=False)
    table.add_column("fact", style="bold")
    table.add_column("value")
    yes = "[green]✓[/]"
    no = "[red]✗[/]"
    mark = lambda good: yes if good else no  # noqa: E731
    table.add_row("job", f"{report.task_key} ({report.duration_s:.2f}s)")
    table.add_row("status", f"{mark(report.status == 'success')} {escape(report.status)}")
    table.add_row(
        "parents updated",
        f"{mark(report.parents_updated == report.parents)} "
        f"{report.parents_updated}/{report.parents}",
    )
    table.add_row(
        "descendants updated inline",
        f"{mark(report.descendants_inline == report.descendants)} "
        f"{report.descendants_inline}/{report.descendants} (inside the job, before it ended)",
    )
    escaped = report.escaped_queued + report.escaped_tasks
    table.add_row(
        "nested jobs escaped to the queue",
        f"{mark(escaped == 0)} {escaped} (django-q2: {report.escaped_queued} queued, "
        f"{report.escaped_tasks} extra task rows)",
    )
    by_model = ", ".join(f"{n} {m}" for m, n in report.locks_peak_by_model.items())
    table.add_row(
        "locks held while running",
        f"{mark(report.locks_peak >= report.parents)} {report.locks_peak} ({by_model}), "
        f"all under the job's key",
    )
    table.add_row(
        "locks after completion",
        f"{mark(report.locks_left == 0)} {report.locks_left}"
        + (" (all released)" if report.locks_left == 0 else " STILL HELD"),
    )
    table.add_row(
        "progress key after completion",
        f"{mark(report.progress_left is None)} "
        + (
            "removed by the completion hook"
            if report.progress_left is None
            else f"still set (written after the job ended): {escape(report.progress_left)!r}"
        ),
    )
    table.add_row(
        "progress messages seen",
        f"{report.progress_seen} ({report.nested_progress_seen} from nested steps)",
    )
    if report.dashboard_status:
        good = report.dashboard_status in {"success", "failed"}
        table.add_row(
            "powercrud dashboard",
            f"{mark(good)} {report.dashboard_status} (user {report.dashboard_user}, last "
            f"progress {escape(report.dashboard_progress)!r})",
        )
    for refusal in report.refusals:
        if not refusal.ids:
            table.add_row("conflict check", f"[yellow]-[/] {escape(refusal.message)}")
            continue
        holders = "; ".join(
            f"{model} {', '.join(sorted(held, key=int))} held by job "
            f"{', '.join(sorted(set(held.values())))}"
            for model, held in refusal.holders.items()
            if held
        )
        table.add_row(
            "second job refused" if refusal.refused else "second job NOT refused",
            f"{mark(refusal.refused)} {escape(refusal.what)} "
            f'(ids {", ".join(map(str, refusal.ids))}): "{escape(refusal.message)}"'
            + (f" ({escape(holders)})" if holders else ""),
        )
    console.print(table)
    if report.tree_text:
        console.print("[bold]job tree[/] (from otel_taskctx's span store; durations per span)")
        if tree is not None:
            console.print(rich_tree(tree))
        else:
            for line in report.tree_text:
                console.print(escape(line))
    if report.failures:
        for failure in report.failures:
            console.print(f"[red]FAILED[/] {escape(failure)}")


_STATE_STYLE = {
    "ok": "green",
    "unset": "green",
    "error": "red",
    "running": "yellow",
    "missing": "dim",
}


def _node_label(node: Any, now_ns: int) -> str:
    from otel_taskctx.spans.render import format_duration

    if node.placeholder:
        return f"[dim]{escape(node.name or '(span not recorded)')}[/]"
    end = node.end_ns if node.end_ns is not None else now_ns
    parts = [
        f"[bold]{escape(node.name)}[/]",
        f"[dim]{node.kind.lower()}[/]",
        format_duration(end - node.start_ns),
        f"[{_STATE_STYLE.get(node.state, 'white')}]{node.state}[/]",
    ]
    if node.worker:  # a run in a process of its own: Celery's worker name, else host:pid
        parts.append(f"[cyan]worker {escape(node.worker)}[/]")
    locked = sum(d.get("count") or 0 for d in node.descendants())
    if locked:
        models = ", ".join(sorted({d["model"] for d in node.descendants()}))
        parts.append(f"locked {locked} {models}")
    steps = len(node.progress())
    if steps:
        parts.append(f"{steps} progress")
    if node.critical:
        parts.append("[magenta]*[/]")
    if node.state == "error" and node.status_message:
        parts.append(f"[red]{escape(node.status_message.splitlines()[0][:120])}[/]")
    return " ".join(parts)


def _collapsed(children: list[Any], keep: int = 2) -> list[Any]:
    """Children with long runs of same-name siblings shortened to first ``keep`` + last."""
    out: list[Any] = []
    i = 0
    while i < len(children):
        j = i
        while j < len(children) and children[j].name == children[i].name:
            j += 1
        run = children[i:j]
        if len(run) > keep + 2:
            out.extend(run[:keep])
            out.append(("more", run[keep:-1]))
            out.append(run[-1])
        else:
            out.extend(run)
        i = j
    return out


def _more_label(nodes: list[Any], now_ns: int) -> str:
    from otel_taskctx.spans.render import format_duration

    durations = sorted(((n.end_ns or now_ns) - n.start_ns) for n in nodes)
    return (
        f"[dim]… {len(nodes)} more {escape(nodes[0].name)} "
        f"({format_duration(durations[0])} – {format_duration(durations[-1])} each)[/]"
    )


def rich_tree(tree: Any) -> Tree:
    top = Tree(
        f"job {tree.root_task_key}: {tree.status} "
        f"({len(tree.job_nodes)} spans, {tree.summary().get('descendants_locked', 0)} descendants locked)"
    )
    stack: list[tuple[Any, Any]] = [(top, root) for root in reversed(tree.roots)]
    while stack:
        parent, node = stack.pop()
        if isinstance(node, tuple):
            parent.add(_more_label(node[1], tree.now_ns))
            continue
        branch = parent.add(_node_label(node, tree.now_ns))
        for child in reversed(_collapsed(node.children)):
            stack.append((branch, child))
    return top


def render_tree_lines(tree: Any) -> list[str]:
    """Plain text of the collapsed tree, for the JSON report."""
    lines: list[str] = []
    stack: list[tuple[int, Any]] = [(0, root) for root in reversed(tree.roots)]
    while stack:
        depth, node = stack.pop()
        if isinstance(node, tuple):
            lines.append("  " * depth + Text.from_markup(_more_label(node[1], tree.now_ns)).plain)
            continue
        lines.append("  " * depth + Text.from_markup(_node_label(node, tree.now_ns)).plain)
        for child in reversed(_collapsed(node.children)):
            stack.append((depth + 1, child))
    return lines


def write_report(path: str, reports: list[JobReport], ok: bool, error: str | None) -> None:
    payload = {
        "ok": ok,
        "error": error,
        "finished_at": datetime.now().isoformat(timespec="seconds"),
        "jobs": [asdict(r) for r in reports],
    }
    Path(path).write_text(json.dumps(payload, indent=2, default=str))


def iter_failures(reports: Iterable[JobReport]) -> list[str]:
    return [f"{r.title.split(':')[0]}: {f}" for r in reports for f in r.failures]
