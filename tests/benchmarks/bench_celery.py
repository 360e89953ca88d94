"""Per-task overhead on a real Celery worker: uninstrumented, opentelemetry-instrumentation-celery
alone, and with otel-taskctx on top.

``python -m tests.benchmarks celery [--quick] [--tasks=N] [--rounds=N] [--broker=filesystem|redis]
[--span-store]``

Each round runs every variant, in alternating order, on one SQLite database (embedded stack)
and a broker of its own queue: kombu's filesystem transport in a temporary directory (the
default: no server) or Redis (``--broker=redis``: DB ``TASKCTX_REDIS_DB`` + 1):

* **uninstrumented** (baseline): no tracer provider (``TASKCTX_NO_PROVIDER``), otel_taskctx
  installed with
  ``AUTO_INSTRUMENT``, ``SPAN_PROCESSOR``, ``SPAN_STORE`` and ``EXPORT_FROM_ENV`` off;
* **otel celery**: an SDK tracer provider and ``CeleryInstrumentor`` (its PRODUCER and
  CONSUMER spans, trace context in the headers), otel_taskctx as above;
* **otel celery + otel-taskctx**: the same and otel_taskctx's instrumentation and span
  processor (a signed identity in every message, verified in the worker, the run registered,
  our attributes on the celery spans); the span store off (its cost is the viewer's: with
  ``--span-store``, a fourth variant with the defaults, the span store on).

A child process per variant starts a worker (the test suite's ``tests.celery_worker``:
``celery worker --pool=prefork --concurrency=1``, with :mod:`tests.benchmarks.celery_bench_tasks`
imported), waits until it has run a first task, publishes
``--tasks`` no-op tasks (``noop.delay(n)``) and a last one that writes a file, and waits for
that file. Measured per task: the producer's CPU (its thread's, over the ``delay`` calls)
and the worker's (its main process and pool process, from ``/proc``, between the first task
and the last). Added CPU and ratios are paired per round, medians over the rounds. Target:
our added CPU per task (variant 3 less variant 2) at most 1.5x what the OpenTelemetry celery
instrumentation alone adds (variant 2 less variant 1).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.benchmarks._celery import (
    REPO_ROOT,
    bench_worker,
    setup_producer,
    tree_cpu,
    variant_env,
    wait_for,
)
from tests.benchmarks._util import table

TARGET = 1.5
OFF = {
    "AUTO_INSTRUMENT": False,
    "SPAN_PROCESSOR": False,
    "SPAN_STORE": False,
    "EXPORT_FROM_ENV": False,
}
ON = {"SPAN_STORE": False, "EXPORT_FROM_ENV": False}
BASE, OTEL, OURS, FULL = (
    "uninstrumented",
    "otel celery",
    "otel celery + otel-taskctx",
    "+ span store",
)
#: name -> (opentelemetry-instrumentation-celery on, OTEL_TASKCTX)
VARIANTS = {BASE: (False, OFF), OTEL: (True, OFF), OURS: (True, ON), FULL: (True, {})}


def _option(argv: list[str], name: str, default: str) -> str:
    return next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")), default)


def _child(tasks: int) -> None:
    """In a child process, with a variant's environment: measure, print JSON."""
    settings = setup_producer()
    from tests.benchmarks.celery_bench_tasks import mark, noop

    with bench_worker(1, settings) as worker:
        done = Path(tempfile.mkdtemp(prefix="bench-celery-")) / "done.json"
        worker_before = tree_cpu(worker.pid)
        cpu = 0.0
        for n in range(tasks):
            start = time.thread_time()
            noop.delay(n)
            cpu += time.thread_time() - start
        mark.delay(str(done))
        wait_for(done.exists, 600, f"{tasks} tasks")
        worker_cpu = tree_cpu(worker.pid) - worker_before
    print(
        json.dumps(
            {"producer_cpu_ms": cpu * 1000 / tasks, "worker_cpu_ms": worker_cpu * 1000 / tasks}
        )
    )


def _run(env: dict[str, str], tasks: int) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.benchmarks.bench_celery", "--child", str(tasks)],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        raise RuntimeError(f"benchmark child failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["cpu_ms"] = result["producer_cpu_ms"] + result["worker_cpu_ms"]
    return result


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    tasks = int(_option(argv, "tasks", "200" if quick else "500"))
    rounds = int(_option(argv, "rounds", "2" if quick else "5"))
    broker = _option(argv, "broker", "filesystem")
    names = [BASE, OTEL, OURS] + ([FULL] if "--span-store" in argv else [])
    run_dir = Path(tempfile.mkdtemp(prefix="bench-celery-"))
    db = str(run_dir / "bench.sqlite3")
    subprocess.run(
        [sys.executable, "-m", "django", "migrate", "-v", "0"],
        env=variant_env(run_dir, db, broker, False, OFF),
        cwd=REPO_ROOT,
        check=True,
    )
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            otel_celery, otel_taskctx = VARIANTS[name]
            env = variant_env(run_dir, db, broker, otel_celery, otel_taskctx)
            results[name].append(_run(env, tasks))
            print(f"  round {r + 1}/{rounds} {name}: {results[name][-1]}", flush=True)
    base = results[BASE]
    rows = []
    for name in names:
        runs = results[name]
        row = [name]
        for metric in ("producer_cpu_ms", "worker_cpu_ms", "cpu_ms"):
            value = statistics.median(x[metric] for x in runs)
            ratio = statistics.median(
                x[metric] / b[metric] for x, b in zip(runs, base, strict=True) if b[metric]
            )
            row += [f"{value:.3f}", "baseline" if runs is base else f"{ratio:.2f}x"]
        added = statistics.median(
            x["cpu_ms"] - b["cpu_ms"] for x, b in zip(runs, base, strict=True)
        )
        row.append("-" if runs is base else f"{added:+.3f}")
        rows.append(row)
    otel_added = [o["cpu_ms"] - b["cpu_ms"] for o, b in zip(results[OTEL], base, strict=True)]
    ours_added = [
        x["cpu_ms"] - o["cpu_ms"] for x, o in zip(results[OURS], results[OTEL], strict=True)
    ]
    ratios = [ours / otel for ours, otel in zip(ours_added, otel_added, strict=True) if otel > 0]
    ratio = statistics.median(ratios) if ratios else float("nan")
    print()
    print(
        table(
            [
                f"Celery worker ({broker} broker)",
                "producer CPU ms",
                "ratio",
                "worker CPU ms",
                "ratio",
                "CPU ms/task",
                "ratio",
                "added CPU ms/task",
            ],
            rows,
        )
    )
    print(
        f"{tasks} no-op tasks per round, {rounds} round(s); prefork worker, 1 process; medians; "
        "paired per round; CPU: producer thread + worker main and pool process"
    )
    met = ratio <= TARGET
    print(
        f"our added CPU per task {statistics.median(ours_added):+.3f} ms vs otel celery's "
        f"{statistics.median(otel_added):+.3f} ms: {ratio:.2f}x "
        f"(target: our added CPU per task <= {TARGET}x what otel celery instrumentation alone "
        f"adds: {'met' if met else 'NOT met'})"
    )
    return 0 if met else 1


if __name__ == "__main__":
    if "--child" in sys.argv:
        _child(int(sys.argv[sys.argv.index("--child") + 1]))
    else:
        sys.exit(main(sys.argv[1:]))
