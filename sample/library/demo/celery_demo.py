"""The nested bulk edit on a real Celery worker, inline and fanned out, timed.

``manage.py taskctx_celery_demo`` starts ``celery worker`` (prefork pool, 4 processes) on the
sample's Celery app (``sample/config/celery.py``: kombu's filesystem transport and the
``file://`` result backend under the run directory, no server), then publishes the books twice
on fresh data with :func:`sample.library.celery_tasks.publish_books`: once with each book's
nested ``publish_book.delay()`` run inline under the job's key (the default), once with
``publish_book_in_parallel`` (``@fan_out``), a child task per book on any pool process. It
checks both runs (the job succeeded, every chapter was updated inside the job, the job's result
was stored only after its last child's, no nested task reached the queue when inline, locks
taken under the job's key and none left) and prints both wall times and the speed-up.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from django.conf import settings
from rich import box
from rich.console import Console
from rich.table import Table

from sample.library.demo.celery_worker import CeleryWorker, stop_on_signals
from sample.library.demo.cluster import child_env, prepare_database
from sample.library.demo.records import DemoFailure

CHAPTER = "library.chapter"
INLINE, FAN_OUT = "inline", "fan-out"


@dataclass
class CeleryRun:
    policy: str
    task_id: str = ""
    task_key: str = ""
    status: str = ""
    #: submit to the job's stored result
    wall_s: float = 0.0
    books: int = 0
    books_published: int = 0
    chapters: int = 0
    chapters_in_job: int = 0
    #: nested tasks that ran as tasks of their own (their results are in the backend)
    child_tasks: int = 0
    #: the worker's pool processes that ran them
    processes: int = 0
    job_ended_last: bool = False
    concurrency: int = 0
    locks_peak: int = 0
    locks_left: int = 0
    tree: Any = None
    failures: list[str] = field(default_factory=list)


def run_celery_demo(console: Console, options: dict[str, Any]) -> list[CeleryRun]:
    from sample.config.celery import app

    policies = [INLINE] if options["no_fan_out"] else [INLINE, FAN_OUT]
    console.rule(
        f"[bold]The nested bulk edit on a celery worker ({options['concurrency']} prefork "
        f"processes): {' vs '.join(policies)}"
    )
    prepare_database()
    app.control.purge()  # tasks left queued by an interrupted run
    env = child_env(options["delay"])
    queue = app.conf.task_default_queue
    worker = CeleryWorker(
        env, Path(settings.VAR_DIR) / "celery-worker.log", queue, options["concurrency"]
    )
    runs: list[CeleryRun] = []
    with stop_on_signals():
        try:
            worker.start()
            ready = worker.wait_ready(timeout=120)
            console.print(
                f"celery worker [cyan]{worker.nodename}[/] running (pid {worker.proc.pid}, "
                f"{len(worker.pool_pids())} prefork processes, queue {queue!r}, broker "
                f"{_broker()}, ready in {ready:.1f}s, log {worker.log_path})"
            )
            for policy in policies:
                runs.append(_run(console, options, worker, policy))
        finally:
            code = worker.stop()
            console.print(f"celery worker stopped (exit code {code})")
    _print_times(console, runs)
    return runs


def _broker() -> str:
    from sample.config.celery import app

    with app.connection_for_write() as connection:
        return str(connection.transport.driver_type)  # filesystem, redis, amqp


def failures(runs: list[CeleryRun]) -> list[str]:
    return [f"{run.policy}: {failure}" for run in runs for failure in run.failures]


def _results_folder() -> Path:
    from sample.config.celery import app

    return Path(os.fsdecode(app.backend.path))


def _stored_results() -> list[dict[str, Any]]:
    """Every task result in the ``file://`` backend (``result_extended``: with its task name)."""
    from sample.config.celery import app

    prefix = app.backend.task_keyprefix.decode()
    out = []
    for path in _results_folder().glob(f"{prefix}*"):
        meta = app.backend.get_task_meta(path.name[len(prefix) :])
        if isinstance(meta.get("date_done"), str):
            meta["date_done"] = datetime.fromisoformat(meta["date_done"])
        out.append(meta)
    return out


def _queued() -> int:
    """Messages waiting in the sample's queue (none where the broker has no such queue yet)."""
    from kombu.exceptions import ChannelError, OperationalError

    from sample.config.celery import app

    name = app.conf.task_default_queue
    try:
        with app.connection_for_write() as connection:
            queue = app.amqp.queues[name](connection.default_channel)
            return queue.queue_declare(passive=True).message_count
    except (ChannelError, OperationalError) as exc:
        if "NOT_FOUND" in str(exc) or "no queue" in str(exc).lower():
            return 0
        raise


def _run(console: Console, options: dict[str, Any], worker: CeleryWorker, policy: str):
    from django.db.models import Max
    from django.utils import timezone

    from otel_taskctx.conflicts import get_conflict_store
    from otel_taskctx.task_manager import TaskManager
    from sample.library import celery_tasks
    from sample.library.models import Book, Chapter
    from sample.library.seed import seed

    seed(books=options["books"], chapters=options["chapters"], albums=0, tracks=0, reset=True)
    for path in _results_folder().glob("celery-task-meta-*"):
        path.unlink()
    book_ids = list(Book.objects.order_by("pk").values_list("pk", flat=True))
    chapter_ids = list(Chapter.objects.values_list("pk", flat=True))
    run = CeleryRun(policy, books=len(book_ids), chapters=len(chapter_ids))
    run.concurrency = worker.concurrency
    store = get_conflict_store(TaskManager())
    log_start = worker.log_size()
    submitted = timezone.now()
    started = time.monotonic()
    result = celery_tasks.publish_books.delay(book_ids, parallel=policy == FAN_OUT)
    run.task_id, run.task_key = result.id, f"celery-{result.id}"
    deadline = started + float(options["timeout"])
    while not result.ready():
        held = store.holders({CHAPTER: chapter_ids}).get(CHAPTER, {})
        run.locks_peak = max(run.locks_peak, sum(1 for h in held.values() if h == run.task_key))
        worker.check_alive()
        if time.monotonic() > deadline:
            raise DemoFailure(f"the {policy} job did not end within {options['timeout']:.0f}s")
        time.sleep(0.05)
    run.wall_s = round(time.monotonic() - started, 2)
    run.status = result.state
    if result.failed():
        run.failures.append(f"the job's error: {result.result!r}")
    stored = _stored_results()
    job = next(m for m in stored if m["task_id"] == result.id)
    nested = {celery_tasks.publish_book.name, celery_tasks.publish_book_in_parallel.name}
    children = [m for m in stored if m.get("name") in nested]
    # published nested tasks: received by the worker (its log) or still in the queue
    received = worker.received(nested, since=log_start)
    run.child_tasks = max(len(children), len(received) + _queued())
    run.processes = len(worker.ran_by({m["task_id"] for m in children}, since=log_start))
    run.books_published = Book.objects.filter(status=Book.Status.PUBLISHED).count()
    synced = Chapter.objects.filter(
        status=Book.Status.PUBLISHED, synced_at__gte=submitted, synced_at__lte=job["date_done"]
    )
    run.chapters_in_job = synced.count()
    last_chapter = Chapter.objects.aggregate(last=Max("synced_at"))["last"]
    ends = [m["date_done"] for m in children] + [last_chapter]
    run.job_ended_last = all(end is not None and job["date_done"] >= end for end in ends)
    # the worker releases the locks right after it stored the result: a moment to do so
    release_by = time.monotonic() + 5
    while True:
        run.locks_left = len(store.holders({CHAPTER: chapter_ids}).get(CHAPTER, {}))
        if not run.locks_left or time.monotonic() > release_by:
            break
        time.sleep(0.05)
    run.tree = _load_tree(run.task_key, consumers=1 + (len(book_ids) if policy == FAN_OUT else 0))
    _judge(run)
    _print(console, run, worker)
    return run


def _load_tree(task_key: str, consumers: int, timeout: float = 10.0):
    """The job's tree from otel_taskctx's span store, once its runs are there (or None)."""
    try:
        from otel_taskctx.spans import flush_span_store
        from otel_taskctx.spans.queries import load_tree
    except ImportError:  # the span store needs the OpenTelemetry SDK
        return None
    flush_span_store()
    deadline = time.monotonic() + timeout
    tree = None
    while time.monotonic() < deadline:
        tree = load_tree(task_key)
        if tree is not None and tree.end_ns is not None:
            runs = [n for n in tree.job_nodes if n.kind == "CONSUMER" and n.worker]
            if len(runs) >= consumers:
                break
        time.sleep(0.3)
    return tree


def _judge(run: CeleryRun) -> None:
    f = run.failures
    if run.status != "SUCCESS":
        f.append(f"the job did not succeed: {run.status}")
    if run.books_published != run.books:
        f.append(f"only {run.books_published}/{run.books} books were published")
    if run.chapters_in_job != run.chapters:
        f.append(f"only {run.chapters_in_job}/{run.chapters} chapters were updated inside the job")
    if run.policy == INLINE and run.child_tasks:
        f.append(f"{run.child_tasks} nested task(s) reached the queue")
    if run.policy == FAN_OUT and run.child_tasks != run.books:
        f.append(f"{run.child_tasks} child tasks for {run.books} books")
    if run.policy == FAN_OUT and run.books > 1 and run.concurrency > 1 and run.processes < 2:
        f.append("every child task ran in one pool process")
    if not run.job_ended_last:
        f.append("the job's result was stored before its last descendant ended")
    if run.chapters and not run.locks_peak:
        f.append("no chapter was ever seen locked under the job's key")
    if run.locks_left:
        f.append(f"{run.locks_left} locks were still held after the job ended")


def _print(console: Console, run: CeleryRun, worker: CeleryWorker) -> None:
    from sample.library.demo.report import rich_tree

    mark = {True: "[green]✓[/]", False: "[red]✗[/]"}
    console.print(
        f"[bold]{run.policy}[/] job {run.task_key}: {run.status} in {run.wall_s:.2f} s "
        "(wall time, submit to stored result)"
    )
    console.print(
        f"{mark[run.books_published == run.books]} books published "
        f"{run.books_published}/{run.books}"
    )
    console.print(
        f"{mark[run.chapters_in_job == run.chapters]} chapters updated inside the job "
        f"{run.chapters_in_job}/{run.chapters}"
    )
    if run.policy == INLINE:
        console.print(
            f"{mark[run.child_tasks == 0]} nested tasks that reached the queue: {run.child_tasks}"
        )
    else:
        console.print(
            f"{mark[run.child_tasks == run.books]} child tasks {run.child_tasks}, run by "
            f"{run.processes} of {worker.nodename}'s {worker.concurrency} pool processes"
        )
    console.print(f"{mark[run.job_ended_last]} the job ended after its last descendant")
    console.print(
        f"{mark[run.locks_peak > 0]} chapters seen locked under the job's key: {run.locks_peak}"
    )
    console.print(f"{mark[run.locks_left == 0]} locks after the job: {run.locks_left}")
    if run.tree is not None:
        console.print("[bold]job tree[/] (from otel_taskctx's span store; worker badges)")
        console.print(rich_tree(run.tree))
    for failure in run.failures:
        console.print(f"[red]FAILED[/] {failure}")


def _print_times(console: Console, runs: list[CeleryRun]) -> None:
    table = Table(box=box.SIMPLE)
    for column in ("nested launches", "job", "wall time", "chapters in the job", "locks after"):
        table.add_column(column)
    for run in runs:
        table.add_row(
            run.policy,
            run.status,
            f"{run.wall_s:.2f}s",
            f"{run.chapters_in_job}/{run.chapters}",
            str(run.locks_left),
        )
    console.print(table)
    if len(runs) == 2:
        inline, fanned = runs
        console.print(
            f"speed-up of the Celery job with fan-out: "
            f"[bold]{inline.wall_s / max(fanned.wall_s, 1e-6):.1f}x[/] (wall time, submit to "
            f"stored result: {inline.wall_s:.2f} s inline, {fanned.wall_s:.2f} s fan-out)"
        )
