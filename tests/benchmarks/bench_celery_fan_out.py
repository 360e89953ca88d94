"""Fan-out vs inline on a real Celery worker (prefork, 4 processes).

``python -m tests.benchmarks celery_fan_out [--quick] [--children=K] [--work-ms=MS]
[--broker=filesystem|redis]``

One job (``bench.fan_job``, published with ``.delay()`` outside any job: a root job) launches
K nested children (``bench.fan_child.delay()``: each reserves one descendant under the job's
key with ``register_descendants`` and does ``--work-ms`` of I/O-like work, a sleep). The same
job runs twice, on a fresh worker each time, embedded stack (SQLite in WAL, its database
cache holding the locks, the barrier in the database), kombu's filesystem transport by
default (``--broker=redis``: Redis DB ``TASKCTX_REDIS_DB`` + 1):

* **inline** (the default policy): every child runs in the job's process, one after the
  other, under the job's key;
* **fan-out** (``OTEL_TASKCTX["FAN_OUT"] = ["bench.fan_child"]``): every child is a real task
  on any of the 4 processes, and the job completes after the last one.

Reported: the wall time from the publish to ``otel_taskctx.signals.job_completed`` (sent in
the worker, recorded by the app), the fan-out/inline ratio (target <= 0.35x; ideal 0.25x with
4 processes), jobs whose completion came before one of their children ended (target 0), the
locks the children took (all of them, or the check below means nothing) and the locks left
after the completion (target 0).

Needs the core's Celery front end with fan-out (``otel_taskctx.signals.job_completed``,
``opentelemetry.instrumentation.taskctx.celery_worker``): without it, it says so and skips.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.benchmarks._celery import (
    REPO_ROOT,
    bench_worker,
    setup_producer,
    variant_env,
    wait_for,
)
from tests.benchmarks._util import table

TARGET = 0.35
SQLITE_INIT = "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"
CORE_MODULES = ("otel_taskctx.signals", "opentelemetry.instrumentation.taskctx.celery_worker")
POLICIES = {"inline": {}, "fan-out": {"FAN_OUT": ["bench.fan_child"]}}


def _option(argv: list[str], name: str, default: str) -> str:
    return next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")), default)


def missing_core() -> list[str]:
    return [m for m in CORE_MODULES if importlib.util.find_spec(m) is None]


def _child(children: int, seconds: float) -> None:
    """In a child process, with a policy's environment: one job, measured; JSON printed."""
    settings = setup_producer()
    from otel_taskctx.conflicts import get_conflict_store
    from otel_taskctx.task_manager import TaskManager
    from tests.benchmarks.celery_bench_tasks import fan_job

    markers = Path(os.environ["BENCH_CELERY_MARKERS"])
    with bench_worker(4, settings):
        started = time.time()
        result = fan_job.delay(children, seconds, str(markers))
        completed = markers / f"completed-{result.id}.json"
        wait_for(completed.exists, 600, "the job's completion")
        wall = time.time() - started
        end = json.loads(completed.read_text())
        ends = [json.loads(p.read_text()) for p in markers.glob("child-*.json")]
        held = get_conflict_store(TaskManager()).holders(
            {"testapp.child": list(range(1, children + 1))}
        )
    print(
        json.dumps(
            {
                "wall_s": wall,
                "children_ended": len(ends),
                "locks_taken": sum(e["reserved"] for e in ends),
                "early": int(len(ends) < children or end["end"] < max(e["end"] for e in ends)),
                "error": end["error"],
                "locks_left": sum(len(ids) for ids in held.values()),
            }
        )
    )


def _run(env: dict[str, str], children: int, seconds: float) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.benchmarks.bench_celery_fan_out", "--child"]
        + [str(children), str(seconds)],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        raise RuntimeError(f"benchmark child failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    missing = missing_core()
    if missing:
        print(
            "celery_fan_out: skipped: Celery fan-out is not in this checkout (no "
            f"{', '.join(missing)}); it comes with the Celery front end (issue 33)"
        )
        return 0
    quick = "--quick" in argv
    children = int(_option(argv, "children", "16" if quick else "40"))
    work_ms = float(_option(argv, "work-ms", "100" if quick else "200"))
    broker = _option(argv, "broker", "filesystem")
    run_dir = Path(tempfile.mkdtemp(prefix="bench-celery-fan-out-"))
    results = {}
    for policy, otel_taskctx in POLICIES.items():
        db = str(run_dir / f"{policy}.sqlite3")
        env = variant_env(run_dir / policy, db, broker, False, otel_taskctx)
        env["TASKCTX_SQLITE_INIT"] = SQLITE_INIT
        env["BENCH_CELERY_MARKERS"] = str(run_dir / f"markers-{policy}")
        Path(env["BENCH_CELERY_MARKERS"]).mkdir()
        for command in (["migrate", "-v", "0"], ["createcachetable"]):
            subprocess.run(
                [sys.executable, "-m", "django", *command], env=env, cwd=REPO_ROOT, check=True
            )
        results[policy] = _run(env, children, work_ms / 1000)
        print(f"  {policy}: {results[policy]}", flush=True)
    inline, fanned = results["inline"], results["fan-out"]
    ratio = fanned["wall_s"] / inline["wall_s"]
    early = inline["early"] + fanned["early"]
    locks = inline["locks_left"] + fanned["locks_left"]
    taken = inline["locks_taken"] + fanned["locks_taken"]
    met = ratio <= TARGET and not early and not locks and taken == 2 * children
    print()
    print(
        table(
            [
                f"Celery, prefork x4 ({broker})",
                "inline s",
                "fan-out s",
                f"ratio (<= {TARGET}x)",
                "jobs ended early",
                "locks taken",
                "locks left",
                "targets met",
            ],
            [
                [
                    f"1 job x {children} children x {work_ms:.0f} ms",
                    f"{inline['wall_s']:.2f}",
                    f"{fanned['wall_s']:.2f}",
                    f"{ratio:.2f}x",
                    str(early),
                    f"{taken}/{2 * children}",
                    str(locks),
                    "yes" if met else "NO",
                ]
            ],
        )
    )
    print(
        "wall: the job's publish -> otel_taskctx's job_completed in the worker; locks: one "
        "descendant reserved by each child under the job's key (register_descendants), held "
        "after the job's completion"
    )
    return 0 if met else 1


if __name__ == "__main__":
    if "--child" in sys.argv:
        at = sys.argv.index("--child")
        _child(int(sys.argv[at + 1]), float(sys.argv[at + 2]))
    else:
        sys.exit(main(sys.argv[1:]))
