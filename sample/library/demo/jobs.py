"""Running one bulk job through powercrud's view and watching it to the end."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column

from sample.library.demo.records import DemoFailure, JobReport, JobSpec, Refusal
from sample.library.demo.report import judge, print_report, render_tree_lines

PROGRESS_UPDATE = re.compile(r"(?:updating|deleting): (\d+)/(\d+)")
OBJECT_REF = re.compile(r"#(\d+)")


def _pending(broker: Any) -> int:
    """Jobs queued, or taken by a worker and not yet acknowledged (where the broker tells)."""
    return int(broker.queue_size() or 0) + int(broker.lock_size() or 0)


def _label(model: type) -> str:
    return f"{model._meta.app_label}.{model._meta.model_name}"


@dataclass
class _Run:
    """One job while it runs: what was asked for and what has been seen so far."""

    spec: JobSpec
    user: Any
    report: JobReport
    child_ids: list[int] = field(default_factory=list)
    wanted: dict[str, list[int]] = field(default_factory=dict)
    started: float = 0.0
    messages: set[str] = field(default_factory=set)
    nested: set[str] = field(default_factory=set)
    tried_parents: bool = False
    tried_children: bool = False

    def note_progress(self, message: str, position: dict[int, int]) -> int:
        """Remember a progress message; returns how many parents it says are done."""
        if message in self.messages:
            return 0
        self.messages.add(message)
        match = PROGRESS_UPDATE.search(message)
        if match:
            return int(match.group(1))
        self.nested.add(message)
        ref = OBJECT_REF.search(message)
        return position.get(int(ref.group(1)), 0) if ref else 0


def _progress_display(console: Console) -> Progress:
    return Progress(
        TextColumn(
            "[progress.description]{task.description}",
            table_column=Column(width=58, no_wrap=True, overflow="ellipsis"),
        ),
        BarColumn(bar_width=30),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


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
        """Submit the bulk edit through powercrud's view, watch it end, record the facts."""
        from django_q.brokers import get_broker
        from django_q.models import Task

        run = _Run(spec, user, self._new_report(spec))
        broker = get_broker()
        tasks_before = set(Task.objects.values_list("id", flat=True))
        queued_before = _pending(broker)
        self._submit(run)
        task = self._watch(run)
        self._record_outcome(run, task)
        self._record_escapes(run, broker, tasks_before, queued_before)
        self._record_cleanup(run)
        self._tree = None
        self.load_tree(run.report, expect_parents=len(spec.parent_ids))
        judge(run.report)
        print_report(self.console, run.report, self._tree)
        return run.report

    def _new_report(self, spec: JobSpec) -> JobReport:
        return JobReport(
            title=spec.title,
            parent_label=_label(spec.parent_model),
            child_label=_label(spec.child_model),
            parents=len(spec.parent_ids),
        )

    def _submit(self, run: _Run) -> None:
        from sample.library.bulk import submit_bulk_edit

        spec, report = run.spec, run.report
        run.child_ids = list(
            spec.child_model.objects.filter(**{f"{spec.child_fk}__in": spec.parent_ids})
            .order_by(spec.child_fk, "pk")
            .values_list("pk", flat=True)
        )
        report.descendants = len(run.child_ids)
        run.wanted = {report.parent_label: spec.parent_ids, report.child_label: run.child_ids}
        self.console.rule(f"[bold]{spec.title}")
        self.console.print(spec.style)
        run.started = time.monotonic()
        submission = submit_bulk_edit(spec.view_class, spec.parent_ids, spec.values, run.user)
        if not submission.queued:
            raise DemoFailure(
                f"powercrud did not queue the bulk edit ({submission.outcome}): {submission.message}"
            )
        report.task_key = submission.task_key
        self.console.print(
            f"powercrud queued [bold]powercrud.tasks.bulk_update_task[/] as job "
            f"[cyan]{report.task_key}[/]"
        )

    def _watch(self, run: _Run) -> Any:
        """Follow the job's progress until powercrud's completion hook has run; try the two
        conflicting bulk edits while it holds its locks. Returns django-q2's Task row."""
        from django_q.models import Task

        spec, report, key = run.spec, run.report, run.report.task_key
        manager = self.manager()
        pending = manager.STATUSES.PENDING
        position = {pk: i for i, pk in enumerate(spec.parent_ids)}
        task, task_seen, last_holder_check, done_at = None, 0.0, 0.0, None
        progress = _progress_display(self.console)
        with progress:
            bar = progress.add_task("queued", total=len(spec.parent_ids))
            completed = 0
            while True:
                now = time.monotonic()
                if now - run.started > self.timeout:
                    raise DemoFailure(
                        f"job {key} did not finish within {self.timeout:.0f}s "
                        f"(last progress: {progress.tasks[0].description!r})"
                    )
                message = manager.get_progress(key)
                if message is not None and message != pending:
                    completed = max(completed, run.note_progress(message, position))
                    progress.update(bar, completed=completed, description=escape(message[:70]))
                if done_at is None and now - last_holder_check >= 0.2:
                    last_holder_check = now
                    self._check_locks(run)
                if task is None:
                    task = Task.objects.filter(name=key, success__isnull=False).first()
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
            finished = task and task.success and task.result is not False
            progress.update(
                bar,
                completed=len(spec.parent_ids) if finished else completed,
                description="finished",
            )
        report.duration_s = round(done_at - run.started, 2) if done_at else 0.0
        report.progress_seen = len(run.messages)
        report.nested_progress_seen = len(run.nested)
        if spec.conflict_views and not run.tried_children:
            report.refusals.append(
                Refusal(
                    f"a bulk edit of {spec.child_model._meta.verbose_name_plural} the job locked",
                    [],
                    False,
                    "not tried: the job ended before its first descendant lock was seen "
                    "(use a larger --delay)",
                )
            )
        return task

    def _check_locks(self, run: _Run) -> None:
        """Record the locks the job holds; once they show, try the conflicting bulk edits."""
        spec, report, key = run.spec, run.report, run.report.task_key
        held = self.holders(run.wanted)
        mine = {m: sum(1 for h in held.get(m, {}).values() if h == key) for m in run.wanted}
        foreign = sum(1 for ids in held.values() for h in ids.values() if h != key)
        report.locks_foreign = max(report.locks_foreign, foreign)
        if sum(mine.values()) > report.locks_peak:
            report.locks_peak = sum(mine.values())
            report.locks_peak_by_model = mine
        if not spec.conflict_views:
            return
        if not run.tried_parents and held.get(report.parent_label):
            run.tried_parents = True
            report.refusals.append(
                self.try_conflict(
                    spec.conflict_views[0],
                    spec.parent_ids[-2:],
                    spec.values,
                    run.user,
                    f"a second bulk edit of {spec.parent_model._meta.verbose_name_plural}"
                    " already in the job",
                )
            )
        locked = [int(i) for i, h in held.get(report.child_label, {}).items() if h == key]
        if not run.tried_children and locked:
            run.tried_children = True
            report.refusals.append(
                self.try_conflict(
                    spec.conflict_views[1],
                    sorted(locked)[:3],
                    {"status": "draft"},
                    run.user,
                    f"a bulk edit of {spec.child_model._meta.verbose_name_plural} the job"
                    " locked from inside save()",
                )
            )

    def _record_outcome(self, run: _Run, task: Any) -> None:
        """The job's status, and which parents and descendants it updated (and when)."""
        spec, report = run.spec, run.report
        assert task is not None
        if not task.success:
            report.status = f"failed: {task.result}"
        elif task.result is False:
            last = next((m for m in run.messages if m.startswith("failed")), "errors reported")
            report.status = f"failed (powercrud reported: {last})"
        else:
            report.status = "success"
        report.parents_updated = spec.parent_model.objects.filter(
            pk__in=spec.parent_ids, **spec.values
        ).count()
        updated = spec.child_model.objects.filter(pk__in=run.child_ids).filter(
            **spec.child_done(spec.values)
        )
        report.descendants_inline = updated.filter(
            **{
                f"{spec.child_time_field}__gte": task.started,
                f"{spec.child_time_field}__lte": task.stopped,
            }
        ).count()
        report.descendants_late = updated.count() - report.descendants_inline

    def _record_escapes(
        self, run: _Run, broker: Any, tasks_before: set[Any], queued_before: int
    ) -> None:
        """Nested jobs that escaped: anything queued or run besides this job (and the probes);
        those still queued or running get a moment to show up or finish."""
        from django_q.models import Task

        report = run.report
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
            .exclude(name=report.task_key)
            .exclude(group="qcluster_testing")
        )
        report.escaped_tasks = new_tasks.count()
        report.escaped_names = sorted({t.func for t in new_tasks})

    def _record_cleanup(self, run: _Run) -> None:
        """Locks left, the dashboard's final status, and progress written after the end."""
        from sample.library.models import AsyncTaskRecord

        report, key = run.report, run.report.task_key
        deadline = time.monotonic() + 5
        while True:
            left = self.holders(run.wanted)
            report.locks_left = sum(len(v) for v in left.values())
            if not report.locks_left or time.monotonic() > deadline:
                break
            time.sleep(0.2)
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
            report.dashboard_progress = record.progress_payload
        # nothing may write the job's progress after it ended (powercrud's progress view would
        # then never report completion)
        late = self.manager().get_progress(key)
        if late is not None and report.progress_left is None:
            report.progress_left = late

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
