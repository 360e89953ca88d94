"""Inline vs fan-out: the same nested bulk edit, timed on a multi-worker qcluster.

``manage.py taskctx_fan_out_demo`` bulk-edits the albums (premium tier) twice on fresh data:
once with nested launches inline (the default: ``Album.save()``'s repricing of its tracks runs
in the job's worker) and once with fan-out (``OTEL_TASKCTX["FAN_OUT"]`` lists the repricing:
each album's tracks are repriced by a child job on another worker, and powercrud's completion
of the job waits for the last one). It checks both runs (job succeeded, every track repriced,
no lock left) and prints both wall times and the speed-up.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings
from rich import box
from rich.console import Console
from rich.table import Table

from sample.library.demo.cluster import ClusterProcess, child_env, prepare_database
from sample.library.demo.records import DemoFailure

REPRICE = "sample.library.tasks.reprice_album_tracks"


@dataclass
class PolicyRun:
    policy: str
    wall_s: float = 0.0
    status: str = ""
    tracks: int = 0
    repriced: int = 0
    locks_left: int = 0


def run_fan_out_demo(console: Console, options: dict[str, Any]) -> list[PolicyRun]:
    console.rule(f"[bold]Inline vs fan-out on a {options['workers']}-worker qcluster")
    prepare_database()
    runs = [_run(console, options, policy) for policy in ("inline", "fan_out")]
    table = Table(box=box.SIMPLE)
    for column in ("nested launches", "job", "wall time", "tracks repriced", "locks after"):
        table.add_column(column)
    for run in runs:
        table.add_row(
            run.policy.replace("_", "-"),
            run.status,
            f"{run.wall_s:.2f}s",
            f"{run.repriced}/{run.tracks}",
            str(run.locks_left),
        )
    console.print(table)
    inline, fanned = runs
    console.print(
        f"speed-up with fan-out: [bold]{inline.wall_s / max(fanned.wall_s, 1e-6):.1f}x[/] "
        f"(wall time, submit to end: {inline.wall_s:.2f} s inline, {fanned.wall_s:.2f} s fan-out)"
    )
    return runs


def failures(runs: list[PolicyRun]) -> list[str]:
    out = []
    for run in runs:
        if run.status != "success":
            out.append(f"{run.policy}: the job did not succeed ({run.status})")
        if run.repriced != run.tracks:
            out.append(f"{run.policy}: {run.repriced}/{run.tracks} tracks repriced")
        if run.locks_left:
            out.append(f"{run.policy}: {run.locks_left} locks left after the job")
    return out


def _run(console: Console, options: dict[str, Any], policy: str) -> PolicyRun:
    from django.contrib.auth import get_user_model
    from django_q.brokers import get_broker
    from django_q.models import Task

    from otel_taskctx.conflicts import get_conflict_store
    from sample.library import views
    from sample.library.async_manager import SampleAsyncManager
    from sample.library.bulk import submit_bulk_edit
    from sample.library.models import Album, Track
    from sample.library.seed import seed

    seeded = seed(books=0, chapters=0, albums=options["albums"], tracks=options["tracks"])
    get_broker().purge_queue()
    user = get_user_model().objects.get(username=seeded.user)
    album_ids = list(Album.objects.order_by("pk").values_list("pk", flat=True))
    track_ids = list(Track.objects.values_list("pk", flat=True))
    env = child_env(options["delay"], options["workers"])
    env["SAMPLE_FAN_OUT"] = "1" if policy == "fan_out" else "0"
    cluster = ClusterProcess(env, Path(settings.VAR_DIR) / f"qcluster-{policy}.log")
    run = PolicyRun(policy, tracks=len(track_ids))
    manager = SampleAsyncManager()
    try:
        cluster.start()
        cluster.wait_ready(timeout=60)
        premium = Album.PriceTier.PREMIUM
        started = time.monotonic()
        submission = submit_bulk_edit(views.AlbumCRUDView, album_ids, {"price_tier": premium}, user)
        if not submission.queued:
            raise DemoFailure(f"powercrud did not queue the bulk edit: {submission.message}")
        key = submission.task_key
        while True:  # until powercrud's completion hook has removed the progress key
            done = Task.objects.filter(name=key, success__isnull=False).exists()
            if done and manager.get_progress(key) is None:
                break
            if time.monotonic() - started > float(options["timeout"]):
                raise DemoFailure(f"the {policy} job did not finish in {options['timeout']}s")
            time.sleep(0.05)
        run.wall_s = round(time.monotonic() - started, 2)
    finally:
        cluster.stop()
    task = Task.objects.filter(name=key).order_by("-stopped").first()
    run.status = "success" if task and task.success and task.result is not False else "failed"
    price = Album.TRACK_PRICES[premium]
    run.repriced = Track.objects.filter(pk__in=track_ids, price=price).count()
    held = get_conflict_store(manager).holders(
        {"library.album": album_ids, "library.track": track_ids}
    )
    run.locks_left = sum(len(v) for v in held.values())
    console.print(f"{policy.replace('_', '-')}: job {key} {run.status} in {run.wall_s:.2f}s")
    return run
