"""The ``taskctx_demo`` command: a nested bulk edit you can watch, end to end.

From a fresh checkout it creates the database, seeds data, starts a real ``qcluster``
subprocess, and submits powercrud's bulk-edit form for many books (through the view, so
powercrud itself reserves the locks and queues ``powercrud.tasks.bulk_update_task``). While the
job runs it shows a progress bar fed by ``AsyncManager.get_progress`` and tries two conflicting
bulk edits (overlapping books, and chapters the job locked from inside ``Book.save()``), which
powercrud must refuse. Then it checks and prints the facts: the job's status, how many
descendants were updated inline, that no nested job escaped to the queue, the locks held and
released, and the job's span tree. A second job does the same for albums, whose ``save()`` is
unchanged powercrud-style code. Any failed check makes the command exit non-zero.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.db import connections
from django.db.utils import OperationalError
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table
from rich.text import Text
from rich.tree import Tree

MANAGE_PY = Path(__file__).resolve().parent.parent / "manage.py"
PROGRESS_UPDATE = re.compile(r"(?:updating|deleting): (\d+)/(\d+)")
OBJECT_REF = re.compile(r"#(\d+)")


class DemoFailure(Exception):
    """The demo cannot go on (the reason is the message)."""


# --------------------------------------------------------------------------------------------
# database and cluster
# --------------------------------------------------------------------------------------------


def ensure_database(alias: str = "default") -> bool:
    """Create the PostgreSQL database named in the settings if it does not exist yet."""
    connection = connections[alias]
    if connection.vendor != "postgresql":
        return False
    try:
        connection.ensure_connection()
        return False
    except OperationalError as exc:
        if "does not exist" not in str(exc):
            raise
    name = connection.settings_dict["NAME"]
    with connection._nodb_cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {connection.ops.quote_name(name)}")
    connection.close()
    return True


def prepare_database() -> list[str]:
    """Migrate both databases and create the cache table; idempotent."""
    done = []
    if ensure_database():
        done.append(f"created database {connections['default'].settings_dict['NAME']}")
    call_command("migrate", interactive=False, verbosity=0)
    done.append("migrated")
    runtime = getattr(settings, "RUNTIME_DB", None)
    if runtime and runtime in settings.DATABASES:
        if getattr(settings, "RUNTIME_DB_SEPARATE", False):
            call_command("migrate", database=runtime, interactive=False, verbosity=0)
            done.append(f"migrated the {runtime!r} database")
        if any("DatabaseCache" in c["BACKEND"] for c in settings.CACHES.values()):
            call_command("createcachetable", database=runtime, verbosity=0)
            done.append("created the cache table")
    return done


class ClusterProcess:
    """A ``manage.py qcluster`` subprocess in its own process group, logging to a file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, str(MANAGE_PY), "qcluster"],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, timeout: float) -> float:
        """Wait until the cluster runs a probe task (powercrud's own health check)."""
        from powercrud.async_manager import AsyncManager

        manager = AsyncManager()
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if not self.alive:
                raise DemoFailure(
                    f"qcluster exited with code {self.proc.returncode if self.proc else '?'}:\n"
                    f"{self.tail()}"
                )
            if manager.validate_async_qcluster(timeout_ms=2000):
                return time.monotonic() - start
            time.sleep(0.2)
        raise DemoFailure(f"qcluster did not answer within {timeout:.0f}s:\n{self.tail()}")

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            # the cluster's own process stops its workers, monitor and pusher in order (a
            # signal to the whole group leaves it waiting for children that died under it)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left in its process group (a worker that did not stop)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(5)
        return self.proc.returncode


def child_env(delay: float | None = None, workers: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["DJANGO_SETTINGS_MODULE"] = os.environ.get(
        "DJANGO_SETTINGS_MODULE", "sample.config.settings"
    )
    if delay is not None:
        env["SAMPLE_SAVE_DELAY"] = str(delay)
    if workers is not None:
        env["SAMPLE_WORKERS"] = str(workers)
    root = str(MANAGE_PY.parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


# --------------------------------------------------------------------------------------------
# one bulk job
# --------------------------------------------------------------------------------------------


@dataclass
class JobSpec:
    """A bulk edit of ``parent_ids`` and how to tell that their descendants followed."""

    title: str
    style: str
    view_class: type
    parent_model: type
    parent_ids: list[int]
    values: dict[str, Any]
    child_model: type
    child_fk: str
    child_done: Callable[[Any], dict[str, Any]]  # field lookups of an updated descendant
    child_time_field: str
    conflict_views: tuple[type, type] | None = None  # (parent view, descendant view)


@dataclass
class Refusal:
    what: str
    ids: list[int]
    refused: bool
    message: str
    holders: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass
class JobReport:
    title: str
    parent_label: str = ""
    child_label: str = ""
    task_key: str = ""
    status: str = "not run"
    ok: bool = False
    duration_s: float = 0.0
    parents: int = 0
    parents_updated: int = 0
    descendants: int = 0
    descendants_inline: int = 0
    descendants_late: int = 0
    escaped_queued: int = 0
    escaped_tasks: int = 0
    escaped_names: list[str] = field(default_factory=list)
    locks_peak: int = 0
    locks_peak_by_model: dict[str, int] = field(default_factory=dict)
    locks_foreign: int = 0
    locks_left: int = 0
    progress_left: str | None = None
    progress_seen: int = 0
    nested_progress_seen: int = 0
    dashboard_status: str = ""
    dashboard_user: str = ""
    refusals: list[Refusal] = field(default_factory=list)
    tree_text: list[str] = field(default_factory=list)
    tree_summary: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def _pending(broker: Any) -> int:
    """Jobs queued, or taken by a worker and not yet acknowledged (where the broker tells)."""
    return int(broker.queue_size() or 0) + int(broker.lock_size() or 0)


def _label(model: type) -> str:
    return f"{model._meta.app_label}.{model._meta.model_name}"


class Demo:
    def __init__(self, console: Console, options: dict[str, Any]) -> None:
        self.console = console
        self.options = options
        self.timeout = float(options["timeout"])

    # helpers --------------------------------------------------------------------------------
    def manager(self):
        from sample.library.async_manager import SampleAsyncManager

        return SampleAsyncManager()

    def store(self):
        from otel_taskctx.conflicts import get_conflict_store

        return get_conflict_store(self.manager())

    def holders(self, wanted: dict[str, list[int]]) -> dict[str, dict[str, str]]:
        found = self.store().holders(wanted)
        return {model: {str(k): str(v) for k, v in held.items()} for model, held in found.items()}

    # the job --------------------------------------------------------------------------------
    def run_job(self, spec: JobSpec, user: Any) -> JobReport:
        from django_q.brokers import get_broker
        from django_q.models import Task

        from sample.library.bulk import submit_bulk_edit

        parent_label, child_label = _label(spec.parent_model), _label(spec.child_model)
        report = JobReport(
            title=spec.title,
            parent_label=parent_label,
            child_label=child_label,
            parents=len(spec.parent_ids),
        )
        children = list(
            spec.child_model.objects.filter(**{f"{spec.child_fk}__in": spec.parent_ids})
            .order_by(spec.child_fk, "pk")
            .values_list("pk", spec.child_fk)
        )
        child_ids = [pk for pk, _ in children]
        report.descendants = len(child_ids)
        wanted = {parent_label: spec.parent_ids, child_label: child_ids}
        broker = get_broker()
        tasks_before = set(Task.objects.values_list("id", flat=True))
        queued_before = _pending(broker)

        self.console.rule(f"[bold]{spec.title}")
        self.console.print(spec.style)
        started = time.monotonic()
        submission = submit_bulk_edit(spec.view_class, spec.parent_ids, spec.values, user)
        if not submission.queued:
            raise DemoFailure(
                f"powercrud did not queue the bulk edit ({submission.outcome}): {submission.message}"
            )
        key = report.task_key = submission.task_key
        self.console.print(
            f"powercrud queued [bold]powercrud.tasks.bulk_update_task[/] as job [cyan]{key}[/]"
        )

        manager = self.manager()
        pending = manager.STATUSES.PENDING
        position = {pk: i for i, pk in enumerate(spec.parent_ids)}
        messages: set[str] = set()
        nested: set[str] = set()
        tried_parents = tried_children = False
        task_seen = 0.0
        last_holder_check = 0.0
        done_at: float | None = None
        task = None
        progress = Progress(
            TextColumn(
                "[progress.description]{task.description}",
                table_column=Column(width=58, no_wrap=True, overflow="ellipsis"),
            ),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        with progress:
            bar = progress.add_task("queued", total=len(spec.parent_ids))
            completed = 0
            while True:
                now = time.monotonic()
                if now - started > self.timeout:
                    raise DemoFailure(
                        f"job {key} did not finish within {self.timeout:.0f}s "
                        f"(last progress: {progress.tasks[0].description!r})"
                    )
                message = manager.get_progress(key)
                if message is not None and message != pending:
                    if message not in messages:
                        messages.add(message)
                        match = PROGRESS_UPDATE.search(message)
                        if match:
                            completed = max(completed, int(match.group(1)))
                        else:
                            nested.add(message)
                            ref = OBJECT_REF.search(message)
                            if ref and int(ref.group(1)) in position:
                                completed = max(completed, position[int(ref.group(1))])
                    progress.update(bar, completed=completed, description=escape(message[:70]))
                if done_at is None and now - last_holder_check >= 0.2:
                    last_holder_check = now
                    held = self.holders(wanted)
                    mine = {m: sum(1 for h in held.get(m, {}).values() if h == key) for m in wanted}
                    foreign = sum(1 for ids in held.values() for h in ids.values() if h != key)
                    report.locks_foreign = max(report.locks_foreign, foreign)
                    if sum(mine.values()) > report.locks_peak:
                        report.locks_peak = sum(mine.values())
                        report.locks_peak_by_model = mine
                    if spec.conflict_views and not tried_parents and held.get(parent_label):
                        tried_parents = True
                        report.refusals.append(
                            self.try_conflict(
                                spec.conflict_views[0],
                                spec.parent_ids[-2:],
                                spec.values,
                                user,
                                f"a second bulk edit of {spec.parent_model._meta.verbose_name_plural}"
                                " already in the job",
                            )
                        )
                    locked_children = [
                        int(i) for i, h in held.get(child_label, {}).items() if h == key
                    ]
                    if spec.conflict_views and not tried_children and locked_children:
                        tried_children = True
                        probe = sorted(locked_children)[:3]
                        report.refusals.append(
                            self.try_conflict(
                                spec.conflict_views[1],
                                probe,
                                {"status": "draft"},
                                user,
                                f"a bulk edit of {spec.child_model._meta.verbose_name_plural} the job"
                                " locked from inside save()",
                            )
                        )
                if task is None:
                    task = Task.objects.filter(name=key, success__isnull=False).first()
                    if task is not None:
                        task_seen = now
                if task is not None:
                    # django-q2 saved the result; powercrud's completion hook then removes the
                    # progress key (its progress view reports completion only once it is gone)
                    if message is None:
                        done_at = now
                        break
                    if now - task_seen > 5:
                        done_at = task_seen
                        report.progress_left = message
                        break
                time.sleep(0.1)
            progress.update(
                bar,
                completed=len(spec.parent_ids)
                if task and task.success and task.result is not False
                else completed,
                description="finished",
            )
        report.duration_s = round(done_at - started, 2) if done_at else 0.0
        report.progress_seen = len(messages)
        report.nested_progress_seen = len(nested)
        if spec.conflict_views and not tried_children:
            report.refusals.append(
                Refusal(
                    f"a bulk edit of {spec.child_model._meta.verbose_name_plural} the job locked",
                    [],
                    False,
                    "not tried: the job ended before its first descendant lock was seen "
                    "(use a larger --delay)",
                )
            )

        # ---- facts -------------------------------------------------------------------------
        assert task is not None
        if not task.success:
            report.status = f"failed: {task.result}"
        elif task.result is False:
            last = next((m for m in messages if m.startswith("failed")), "errors reported")
            report.status = f"failed (powercrud reported: {last})"
        else:
            report.status = "success"
        report.parents_updated = spec.parent_model.objects.filter(
            pk__in=spec.parent_ids, **spec.values
        ).count()
        child_rows = spec.child_model.objects.filter(pk__in=child_ids)
        updated = child_rows.filter(**spec.child_done(spec.values))
        t0, t1 = task.started, task.stopped
        report.descendants_inline = updated.filter(
            **{f"{spec.child_time_field}__gte": t0, f"{spec.child_time_field}__lte": t1}
        ).count()
        report.descendants_late = updated.count() - report.descendants_inline

        # nested jobs that escaped: anything queued or run besides this job (and the probes);
        # give those still queued or running a moment to show up or finish
        deadline = time.monotonic() + 3
        time.sleep(0.3)
        while True:
            waiting = max(0, _pending(broker) - queued_before)
            report.escaped_queued = waiting  # still queued (or running) at the end
            if not waiting or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        new_tasks = (
            Task.objects.exclude(id__in=tasks_before)
            .exclude(name=key)
            .exclude(group="qcluster_testing")
        )
        report.escaped_tasks = new_tasks.count()
        report.escaped_names = sorted({t.func for t in new_tasks})

        deadline = time.monotonic() + 5
        while True:
            left = self.holders(wanted)
            report.locks_left = sum(len(v) for v in left.values())
            if not report.locks_left or time.monotonic() > deadline:
                break
            time.sleep(0.2)

        from sample.library.models import AsyncTaskRecord

        final = {AsyncTaskRecord.Status.SUCCESS, AsyncTaskRecord.Status.FAILED}
        deadline = time.monotonic() + 3
        while True:
            record = AsyncTaskRecord.objects.filter(task_name=key).first()
            if record is None or record.status in final or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if record is not None:
            report.dashboard_status = record.status
            report.dashboard_user = record.user_label
        # nothing may write the job's progress after it ended (powercrud's progress view would
        # then never report completion)
        late = manager.get_progress(key)
        if late is not None and report.progress_left is None:
            report.progress_left = late

        self.load_tree(report, expect_parents=len(spec.parent_ids))
        self.judge(report)
        self.print_report(report)
        return report

    def try_conflict(self, view_class, ids, values, user, what) -> Refusal:
        from sample.library.bulk import submit_bulk_edit

        label = _label(view_class.model)
        held = self.holders({label: ids})
        submission = submit_bulk_edit(view_class, ids, values, user)
        refused = submission.outcome == "conflict"
        if submission.queued:
            message = f"NOT refused: queued as job {submission.task_key}"
        else:
            message = submission.message
            message = re.sub(r"^Bulk Operation Conflict\s*", "", message)
        return Refusal(what, list(ids), refused, message, held)

    def load_tree(self, report: JobReport, expect_parents: int) -> None:
        """The job's span tree from otel_taskctx's span store (waits for the spans to land)."""
        try:
            from otel_taskctx.spans import flush_span_store
            from otel_taskctx.spans.queries import load_tree
        except ImportError:
            report.tree_text = ["(otel_taskctx's span store is not installed: no tree)"]
            return
        from otel_taskctx.conf import DEFAULTS, get_setting

        if "SPAN_STORE" in DEFAULTS and not get_setting("SPAN_STORE"):
            report.tree_text = ["(OTEL_TASKCTX['SPAN_STORE'] is off: no tree)"]
            return
        if not get_setting("AUTO_INSTRUMENT"):
            report.tree_text = ["(the worker instrumentation is off: no job spans, no tree)"]
            return
        flush_span_store()
        start = time.monotonic()
        tree = None
        while time.monotonic() - start < 15:
            tree = load_tree(report.task_key)
            if tree is None and time.monotonic() - start > 4:
                break  # nothing at all was stored for this job
            if tree is not None and tree.end_ns is not None:
                job = [n for n in tree.job_nodes if not n.placeholder]
                consumers = [n for n in job if n.kind == "CONSUMER"]
                if consumers and len(job) > expect_parents:
                    break
            time.sleep(0.3)
        if tree is None:
            report.failures.append(f"no spans were stored for job {report.task_key}")
            return
        report.tree_summary = {
            k: v for k, v in tree.summary().items() if k not in {"trace_ids", "processes"}
        }
        report.tree_text = render_tree_lines(tree)
        self._tree = tree

    # verdict --------------------------------------------------------------------------------
    def judge(self, report: JobReport) -> None:
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
            f.append(
                f"the job held {report.locks_peak} locks, fewer than its {report.parents} parents"
            )
        if report.descendants and not report.locks_peak_by_model.get(report.child_label):
            f.append("no descendant was ever locked under the job's key")
        if report.locks_foreign:
            f.append(f"{report.locks_foreign} of the job's objects were locked by another task")
        if report.locks_left:
            f.append(f"{report.locks_left} locks were still held after the job ended")
        if report.dashboard_status and report.dashboard_status not in {"success", "failed"}:
            f.append(
                f"powercrud's dashboard still shows the ended job as {report.dashboard_status!r}"
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

    # output ---------------------------------------------------------------------------------
    def print_report(self, report: JobReport) -> None:
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
                f"{mark(good)} {report.dashboard_status} (user {report.dashboard_user})",
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
        self.console.print(table)
        if report.tree_text:
            self.console.print(
                "[bold]job tree[/] (from otel_taskctx's span store; durations per span)"
            )
            tree = getattr(self, "_tree", None)
            if tree is not None:
                self.console.print(rich_tree(tree))
            else:
                for line in report.tree_text:
                    self.console.print(escape(line))
        if report.failures:
            for failure in report.failures:
                self.console.print(f"[red]FAILED[/] {escape(failure)}")


# --------------------------------------------------------------------------------------------
# the span tree
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# the whole demo
# --------------------------------------------------------------------------------------------


def job_specs(book_ids: list[int], album_ids: list[int]) -> list[JobSpec]:
    from sample.library import models, views

    specs = [
        JobSpec(
            title=f"Job 1: publish {len(book_ids)} books (Book.save() uses the otel_taskctx helpers)",
            style=(
                "Book.save() calls skip_nested_async(); inside the job it locks its chapters with "
                "register_descendants() and updates them inline with report_progress()."
            ),
            view_class=views.BookCRUDView,
            parent_model=models.Book,
            parent_ids=book_ids,
            values={"status": models.Book.Status.PUBLISHED},
            child_model=models.Chapter,
            child_fk="book",
            child_done=lambda values: {"status": values["status"]},
            child_time_field="synced_at",
            conflict_views=(views.BookCRUDView, views.ChapterCRUDView),
        )
    ]
    if album_ids:
        premium = models.Album.PriceTier.PREMIUM
        specs.append(
            JobSpec(
                title=(
                    f"Job 2: move {len(album_ids)} albums to the premium tier "
                    "(Album.save() is unchanged powercrud-style code)"
                ),
                style=(
                    "Album.save() always calls AsyncManager().launch_async_task(...) for its "
                    "tracks; the instrumentation runs that nested launch inline, under the job's key."
                ),
                view_class=views.AlbumCRUDView,
                parent_model=models.Album,
                parent_ids=album_ids,
                values={"price_tier": premium},
                child_model=models.Track,
                child_fk="album",
                child_done=lambda values: {
                    "price": models.Album.TRACK_PRICES[values["price_tier"]]
                },
                child_time_field="repriced_at",
            )
        )
    return specs


def run_demo(console: Console, options: dict[str, Any]) -> list[JobReport]:
    from otel_taskctx.conf import get_setting
    from sample.library.models import Album, Book
    from sample.library.seed import seed

    instrumented = bool(get_setting("AUTO_INSTRUMENT"))
    console.print(
        Panel.fit(
            "otel-taskctx demo: powercrud bulk edits whose save() does nested async work\n"
            f"stack: {getattr(settings, 'STACK', '?')}   data: {settings.DATABASES['default']['NAME']}\n"
            + (
                "worker instrumentation: on (the otel_taskctx app is installed)"
                if instrumented
                else "worker instrumentation: OFF (SAMPLE_INSTRUMENT=0): powercrud on its own, "
                "expect nested jobs to escape"
            ),
            border_style="cyan",
        )
    )
    t0 = time.monotonic()
    steps = prepare_database()
    console.print(f"database: {', '.join(steps)} ({time.monotonic() - t0:.1f}s)")
    seeded = seed(
        books=options["books"],
        chapters=options["chapters"],
        albums=options["albums"],
        tracks=options["tracks"],
        reset=True,
    )
    console.print(
        f"seeded {seeded.books} books x {options['chapters']} chapters, "
        f"{seeded.albums} albums x {options['tracks']} tracks; user {seeded.user!r}"
    )
    from django.contrib.auth import get_user_model
    from django_q.brokers import get_broker

    get_broker().purge_queue()  # jobs left over from an interrupted run
    stale = stale_cleanup()
    if stale:
        console.print(
            f"released the locks and progress of {stale} job(s) an earlier run left behind"
        )
    user = get_user_model().objects.get(username=seeded.user)

    log_path = Path(settings.VAR_DIR) / "qcluster.log"
    cluster = ClusterProcess(child_env(options["delay"], options["workers"]), log_path)
    reports: list[JobReport] = []
    try:
        cluster.start()
        ready = cluster.wait_ready(timeout=60)
        console.print(
            f"qcluster running (pid {cluster.proc.pid}, {options['workers']} workers, "
            f"ready in {ready:.1f}s, log {log_path}); save delay {options['delay']}s per descendant"
        )
        book_ids = list(Book.objects.order_by("pk").values_list("pk", flat=True))
        album_ids = list(Album.objects.order_by("pk").values_list("pk", flat=True))
        if len(book_ids) < 2:
            raise DemoFailure("the demo needs at least 2 books (powercrud queues 2 or more rows)")
        if album_ids and len(album_ids) < 2:
            album_ids = []
        demo = Demo(console, options)
        for spec in job_specs(book_ids, album_ids):
            reports.append(demo.run_job(spec, user))
            if not cluster.alive:
                raise DemoFailure(f"qcluster died during the job:\n{cluster.tail()}")
    finally:
        code = cluster.stop()
        console.print(f"qcluster stopped (exit code {code})")
    return reports


def stale_cleanup() -> int:
    """powercrud's own cleanup (``pcrud_cleanup_async``) of jobs that never completed.

    A run interrupted mid-job leaves that job's locks (an hour's TTL) and progress behind; on a
    recreated database the ids come back and the new job would be refused. The demo owns the
    sample's data, so every active job that did not finish is stale here.
    """
    from sample.library.async_manager import SampleAsyncManager

    summary = SampleAsyncManager().cleanup_completed_tasks()
    return sum(
        1
        for entry in summary.get("cleaned", {}).values()
        if entry.get("reason") != "completed successfully"
    )


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
