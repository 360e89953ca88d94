"""The nested bulk edit through Django's own task framework and a real ``db_worker``.

``manage.py taskctx_tasks_demo`` enqueues :func:`sample.library.django_tasks.publish_books` for
every book, runs the queue with django-tasks-db's ``manage.py db_worker`` in a subprocess, and
checks the facts: the job succeeded, every chapter was updated inside it, no nested task
reached the queue, the chapters were locked under the job's key while it ran, and no lock is
left afterwards.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console

from sample.library.demo.cluster import MANAGE_PY, child_env, prepare_database
from sample.library.demo.records import DemoFailure

CHAPTER = "library.chapter"


@dataclass
class TasksReport:
    task_key: str = ""
    status: str = ""
    duration_s: float = 0.0
    #: the job's own time (its result's start to its end)
    job_s: float = 0.0
    books: int = 0
    books_published: int = 0
    chapters: int = 0
    chapters_inline: int = 0
    queued_tasks: int = 0
    locks_peak: int = 0
    locks_left: int = 0
    progress: str | None = None
    failures: list[str] = field(default_factory=list)


def _task_key(db_result: Any) -> str:
    """The job's task key: a root task's worker derives it from the task's own result id."""
    return f"task-{db_result.id}"


def run_tasks_demo(console: Console, options: dict[str, Any]) -> TasksReport:
    from django_tasks_db.models import DBTaskResult

    from otel_taskctx.conflicts import get_conflict_store
    from otel_taskctx.task_manager import TaskManager, get_progress
    from sample.library.django_tasks import publish_books
    from sample.library.models import Book, Chapter
    from sample.library.seed import seed

    console.rule("[bold]The same nested bulk edit through django.tasks + db_worker")
    prepare_database()
    seed(books=options["books"], chapters=options["chapters"], albums=0, tracks=0, reset=True)
    book_ids = list(Book.objects.order_by("pk").values_list("pk", flat=True))
    chapter_ids = list(Chapter.objects.values_list("pk", flat=True))
    report = TasksReport(books=len(book_ids), chapters=len(chapter_ids))
    DBTaskResult.objects.all().delete()
    result = publish_books.enqueue(book_ids)
    report.task_key = key = _task_key(DBTaskResult.objects.get(id=result.id))
    console.print(f"enqueued publish_books for {len(book_ids)} books as task [cyan]{key}[/]")
    store = get_conflict_store(TaskManager())
    env = child_env(options["delay"])
    started = time.monotonic()
    worker = subprocess.Popen(
        [
            sys.executable,
            str(MANAGE_PY),
            "db_worker",
            "--batch",
            "--no-startup-delay",
            "--no-reload",
            "--interval",
            "0.1",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    while worker.poll() is None:
        held = store.holders({CHAPTER: chapter_ids}).get(CHAPTER, {})
        report.locks_peak = max(report.locks_peak, sum(1 for h in held.values() if h == key))
        if time.monotonic() - started > float(options["timeout"]):
            worker.kill()
            raise DemoFailure(f"db_worker did not finish within {options['timeout']:.0f}s")
        time.sleep(0.1)
    output = worker.stdout.read() if worker.stdout else ""
    report.duration_s = round(time.monotonic() - started, 2)
    if worker.returncode != 0:
        raise DemoFailure(f"db_worker exited with {worker.returncode}:\n{output[-2000:]}")
    stored = DBTaskResult.objects.get(id=result.id)
    report.status = str(stored.status)
    if stored.started_at and stored.finished_at:
        report.job_s = round((stored.finished_at - stored.started_at).total_seconds(), 2)
    report.queued_tasks = DBTaskResult.objects.count()
    report.books_published = Book.objects.filter(status=Book.Status.PUBLISHED).count()
    report.chapters_inline = Chapter.objects.filter(
        status=Book.Status.PUBLISHED,
        synced_at__gte=stored.started_at,
        synced_at__lte=stored.finished_at,
    ).count()
    report.locks_left = len(store.holders({CHAPTER: chapter_ids}).get(CHAPTER, {}))
    report.progress = get_progress(key)
    _judge(report)
    _print(console, report)
    return report


def _judge(report: TasksReport) -> None:
    f = report.failures
    if report.status != "SUCCESSFUL":
        f.append(f"the task did not succeed: {report.status}")
    if report.books_published != report.books:
        f.append(f"only {report.books_published}/{report.books} books were published")
    if report.chapters_inline != report.chapters:
        f.append(
            f"only {report.chapters_inline}/{report.chapters} chapters were updated inside the task"
        )
    if report.queued_tasks != 1:
        f.append(f"{report.queued_tasks - 1} nested task(s) reached the queue")
    if report.chapters and not report.locks_peak:
        f.append("no chapter was ever seen locked under the task's key")
    if report.locks_left:
        f.append(f"{report.locks_left} locks were still held after the task ended")


def _print(console: Console, report: TasksReport) -> None:
    mark = {True: "[green]✓[/]", False: "[red]✗[/]"}
    console.print(
        f"inline job {report.task_key}: {report.status}, run {report.job_s:.2f} s by a "
        f"db_worker ({report.duration_s:.2f} s from enqueue to result)"
    )
    console.print(
        f"{mark[report.books_published == report.books]} books published "
        f"{report.books_published}/{report.books}"
    )
    console.print(
        f"{mark[report.chapters_inline == report.chapters]} chapters updated inside "
        f"the task {report.chapters_inline}/{report.chapters}"
    )
    console.print(
        f"{mark[report.queued_tasks == 1]} nested tasks that reached the queue: "
        f"{report.queued_tasks - 1}"
    )
    console.print(
        f"{mark[report.locks_peak > 0]} chapters seen locked under the task's key: "
        f"{report.locks_peak}"
    )
    console.print(f"{mark[report.locks_left == 0]} locks after the task: {report.locks_left}")
    console.print(f"last progress: {report.progress!r}")
    for failure in report.failures:
        console.print(f"[red]FAILED[/] {failure}")
