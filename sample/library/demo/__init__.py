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

import time
from pathlib import Path
from typing import Any

from django.conf import settings
from rich.console import Console
from rich.panel import Panel

from sample.library.demo.cluster import (
    MANAGE_PY,
    ClusterProcess,
    child_env,
    prepare_database,
    stale_cleanup,
)
from sample.library.demo.jobs import Demo
from sample.library.demo.records import DemoFailure, JobReport, JobSpec, Refusal
from sample.library.demo.report import iter_failures, write_report

__all__ = [
    "MANAGE_PY",
    "ClusterProcess",
    "Demo",
    "DemoFailure",
    "JobReport",
    "JobSpec",
    "Refusal",
    "child_env",
    "iter_failures",
    "job_specs",
    "prepare_database",
    "run_demo",
    "stale_cleanup",
    "write_report",
]


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
