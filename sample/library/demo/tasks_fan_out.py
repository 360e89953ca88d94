"""The ``django.tasks`` bulk edit again, with each book's nested task fanned out.

After the inline run (:mod:`sample.library.demo.django_tasks`), ``manage.py
taskctx_tasks_demo`` publishes the books once more with ``SAMPLE_FAN_OUT=1``: inside the job,
each ``publish_book.enqueue()`` becomes a child task of its own, run by any of several
``db_worker`` processes, and the job's result stays ``RUNNING`` until the last child has ended.
It checks the run (job succeeded after its children, every chapter updated, several workers,
no lock left) and prints both job times and the speed-up.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from sample.library.demo.cluster import MANAGE_PY, child_env
from sample.library.demo.records import DemoFailure

CHAPTER = "library.chapter"


@dataclass
class FanOutTasksReport:
    status: str = ""
    job_s: float = 0.0
    inline_job_s: float = 0.0
    books: int = 0
    books_published: int = 0
    chapters: int = 0
    chapters_in_job: int = 0
    children: int = 0
    workers: int = 0
    job_ended_last: bool = False
    locks_left: int = 0
    failures: list[str] = field(default_factory=list)


def _workers(count: int, delay: float, logs: Path) -> list[subprocess.Popen]:
    """``count`` db_workers (fan-out on), each logging to a file in ``logs``; returns once
    every one has started (so that all of them are there when the job fans out)."""
    env = child_env(delay)
    env["SAMPLE_FAN_OUT"] = "1"
    argv = [sys.executable, str(MANAGE_PY), "db_worker", "--no-startup-delay", "--no-reload"]
    workers = []
    for n in range(count):
        with open(logs / f"worker-{n + 1}.log", "w") as log:
            workers.append(
                subprocess.Popen(
                    [*argv, "--interval", "0.05", "--worker-id", f"demo-worker-{n + 1}"],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    deadline = time.monotonic() + 120
    for n, worker in enumerate(workers):
        path = logs / f"worker-{n + 1}.log"
        while "Starting worker" not in path.read_text():
            if worker.poll() is not None or time.monotonic() > deadline:
                _stop(workers)
                raise DemoFailure(f"db_worker {n + 1} did not start:\n{path.read_text()[-2000:]}")
            time.sleep(0.05)
    return workers


def _stop(workers: list[subprocess.Popen]) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)  # db_worker ends after its current task
    for worker in workers:
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def run_tasks_fan_out(
    console: Console, options: dict[str, Any], inline_job_s: float
) -> FanOutTasksReport:
    from django_tasks_db.models import DBTaskResult

    from otel_taskctx.conflicts import get_conflict_store
    from otel_taskctx.task_manager import TaskManager
    from sample.library.django_tasks import publish_books
    from sample.library.models import Book, Chapter
    from sample.library.seed import seed

    count = int(options["fan_out_workers"])
    console.rule(f"[bold]The same django.tasks job with fan-out on {count} db_workers")
    seed(books=options["books"], chapters=options["chapters"], albums=0, tracks=0, reset=True)
    book_ids = list(Book.objects.order_by("pk").values_list("pk", flat=True))
    chapter_ids = list(Chapter.objects.values_list("pk", flat=True))
    report = FanOutTasksReport(
        books=len(book_ids), chapters=len(chapter_ids), inline_job_s=inline_job_s
    )
    DBTaskResult.objects.all().delete()
    logs = Path(tempfile.mkdtemp(prefix="taskctx-db-workers-"))
    workers = _workers(count, options["delay"], logs)
    try:
        result = publish_books.enqueue(book_ids)
        deadline = time.monotonic() + float(options["timeout"])
        while DBTaskResult.objects.get(id=result.id).status in ("READY", "RUNNING"):
            dead = [n for n, w in enumerate(workers) if w.poll() is not None]
            if dead:
                output = (logs / f"worker-{dead[0] + 1}.log").read_text()[-2000:]
                raise DemoFailure(f"db_worker {dead[0] + 1} exited:\n{output}")
            if time.monotonic() > deadline:
                raise DemoFailure(f"the job did not end within {options['timeout']:.0f}s")
            time.sleep(0.05)
    finally:
        _stop(workers)
        shutil.rmtree(logs, ignore_errors=True)
    job = DBTaskResult.objects.get(id=result.id)
    children = DBTaskResult.objects.exclude(id=result.id)
    report.status = str(job.status)
    if job.status == "FAILED":
        lines = [line for line in (job.traceback or "").splitlines() if line.strip()]
        report.failures.append(
            f"the job's error: {lines[-1] if lines else job.exception_class_path}"
        )
    report.job_s = round((job.finished_at - job.started_at).total_seconds(), 2)
    report.children = children.count()
    report.workers = len({w for c in children for w in c.worker_ids})
    ends = [c.finished_at for c in children if c.finished_at]
    report.job_ended_last = bool(ends) and job.finished_at >= max(ends)
    report.books_published = Book.objects.filter(status=Book.Status.PUBLISHED).count()
    report.chapters_in_job = Chapter.objects.filter(
        status=Book.Status.PUBLISHED,
        synced_at__gte=job.started_at,
        synced_at__lte=job.finished_at,
    ).count()
    store = get_conflict_store(TaskManager())
    report.locks_left = len(store.holders({CHAPTER: chapter_ids}).get(CHAPTER, {}))
    _judge(report, count)
    _print(console, report)
    return report


def _judge(report: FanOutTasksReport, count: int) -> None:
    f = report.failures
    if report.status != "SUCCESSFUL":
        f.append(f"the fan-out job did not succeed: {report.status}")
    if report.books_published != report.books:
        f.append(f"only {report.books_published}/{report.books} books were published")
    if report.chapters_in_job != report.chapters:
        f.append(f"only {report.chapters_in_job}/{report.chapters} chapters inside the job")
    if report.children != report.books:
        f.append(f"{report.children} child tasks for {report.books} books")
    if not report.job_ended_last:
        f.append("the job ended before one of its child tasks")
    if count > 1 and report.books > count and report.workers < 2:
        f.append("every child task ran on one db_worker")
    if report.locks_left:
        f.append(f"{report.locks_left} locks were still held after the job ended")


def _print(console: Console, report: FanOutTasksReport) -> None:
    mark = {True: "[green]✓[/]", False: "[red]✗[/]"}
    console.print(f"fan-out job: {report.status}, run {report.job_s:.2f} s (start to end)")
    console.print(
        f"{mark[report.children == report.books]} child tasks {report.children}, run by "
        f"{report.workers} db_worker(s)"
    )
    console.print(f"{mark[report.job_ended_last]} the job ended after its last child task")
    console.print(
        f"{mark[report.chapters_in_job == report.chapters]} chapters updated inside the job "
        f"{report.chapters_in_job}/{report.chapters}"
    )
    console.print(f"{mark[report.locks_left == 0]} locks after the job: {report.locks_left}")
    console.print(
        f"speed-up of the django.tasks job with fan-out: "
        f"[bold]{report.inline_job_s / max(report.job_s, 1e-6):.1f}x[/] "
        f"(job run time: {report.inline_job_s:.2f} s inline, {report.job_s:.2f} s fan-out)"
    )
    for failure in report.failures:
        console.print(f"[red]FAILED[/] {failure}")
