"""Per-task overhead through Django's task framework and a real ``db_worker``.

``python -m tests.benchmarks django_tasks [--quick] [--tasks=N] [--rounds=N]``

Each round runs two variants, in alternating order, on one SQLite database (embedded stack):

* **uninstrumented** (baseline): ``OTEL_TASKCTX`` with ``AUTO_INSTRUMENT``, ``SPAN_PROCESSOR``,
  ``SPAN_STORE`` and ``EXPORT_FROM_ENV`` off, in the enqueuing process and the worker;
* **+ span store (full)**: the defaults: ``django.tasks`` instrumented (signed identity in every
  task, PRODUCER and CONSUMER spans), the SDK, our span processor and the span store.

A child process per variant enqueues ``--tasks`` small tasks (``noop``) and then runs them all
with ``manage.py db_worker --batch`` in a subprocess. Measured per task: the enqueuing
thread's CPU time, the worker's CPU time (its process CPU over the batch, less the CPU of a
``db_worker --batch`` run with nothing to do in the same variant: start-up and shut-down), and
the wall time from the first task's start to the last task's end (the worker's own
timestamps). Ratios are paired per round, medians over the rounds.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.benchmarks._util import table

REPO_ROOT = Path(__file__).resolve().parents[2]
OFF = {
    "AUTO_INSTRUMENT": False,
    "SPAN_PROCESSOR": False,
    "SPAN_STORE": False,
    "EXPORT_FROM_ENV": False,
}
VARIANTS = (("uninstrumented", OFF), ("+ span store (full)", {}))


def _env(db: str, otel: dict) -> dict[str, str]:
    return dict(
        os.environ,
        DJANGO_SETTINGS_MODULE="tests.settings",
        TASKCTX_STACK="embedded",
        TASKCTX_DB_NAME=db,
        TASKCTX_TEST_OTEL_TASKCTX=json.dumps(otel),
        PYTHONPATH=str(REPO_ROOT),
    )


def _worker_cpu(env: dict[str, str]) -> float:
    """CPU seconds of one ``db_worker --batch`` run (the worker and its children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "django",
            "db_worker",
            "--batch",
            "--no-startup-delay",
            "--no-reload",
            "--interval",
            "0.05",
        ],
        env=env,
        cwd=REPO_ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _child(tasks: int) -> None:
    """In a child process: enqueue, run the batch, print the measurements as JSON."""
    import django

    django.setup()
    from django_tasks_db.models import DBTaskResult

    from tests.testapp.django_tasks import noop

    env = dict(os.environ)
    DBTaskResult.objects.all().delete()
    empty = _worker_cpu(env)
    cpu = 0.0
    for n in range(tasks):
        start = time.thread_time()
        noop.enqueue(n)
        cpu += time.thread_time() - start
    worker = _worker_cpu(env)
    rows = DBTaskResult.objects.all()
    first = min(r.started_at for r in rows)
    last = max(r.finished_at for r in rows)
    assert rows.count() == tasks and all(r.status == "SUCCESSFUL" for r in rows)
    print(
        json.dumps(
            {
                "enqueue_cpu_ms": cpu * 1000 / tasks,
                "worker_cpu_ms": max(0.0, worker - empty) * 1000 / tasks,
                "wall_ms": (last - first).total_seconds() * 1000 / tasks,
            }
        )
    )


def _run(db: str, otel: dict, tasks: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "tests.benchmarks.bench_django_tasks", "--child", str(tasks)],
        env=_env(db, otel),
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    tasks = next(
        (int(a.split("=")[1]) for a in argv if a.startswith("--tasks=")), 100 if quick else 300
    )
    rounds = next(
        (int(a.split("=")[1]) for a in argv if a.startswith("--rounds=")), 2 if quick else 5
    )
    db = str(Path(tempfile.mkdtemp(prefix="bench-tasks-")) / "bench.sqlite3")
    subprocess.run(
        [sys.executable, "-m", "django", "migrate", "-v", "0"],
        env=_env(db, OFF),
        cwd=REPO_ROOT,
        check=True,
    )
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _ in VARIANTS}
    for r in range(rounds):
        order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
        for name, otel in order:
            results[name].append(_run(db, otel, tasks))
            print(f"  round {r + 1}/{rounds} {name}: {results[name][-1]}", flush=True)
    base = results[VARIANTS[0][0]]
    rows = []
    for name, _ in VARIANTS:
        runs = results[name]
        row = [name]
        for metric in ("enqueue_cpu_ms", "worker_cpu_ms", "wall_ms"):
            value = statistics.median(x[metric] for x in runs)
            ratio = statistics.median(
                x[metric] / b[metric] for x, b in zip(runs, base, strict=True) if b[metric]
            )
            row += [f"{value:.2f}", "baseline" if runs is base else f"{ratio:.2f}x"]
        added = statistics.median(
            (x["enqueue_cpu_ms"] + x["worker_cpu_ms"]) - (b["enqueue_cpu_ms"] + b["worker_cpu_ms"])
            for x, b in zip(runs, base, strict=True)
        )
        row.append("-" if runs is base else f"{added:+.2f}")
        rows.append(row)
    print()
    print(
        table(
            [
                "django.tasks + db_worker (SQLite)",
                "enqueue CPU ms",
                "ratio",
                "worker CPU ms",
                "ratio",
                "wall ms/task",
                "ratio",
                "added CPU ms/task",
            ],
            rows,
        )
    )
    print(
        f"{tasks} tasks per batch, {rounds} round(s); medians; ratios paired per round; worker "
        "CPU less an empty db_worker run; wall: first task started -> last task finished"
    )
    return 0


if __name__ == "__main__":
    if "--child" in sys.argv:
        _child(int(sys.argv[sys.argv.index("--child") + 1]))
    else:
        sys.exit(main(sys.argv[1:]))
