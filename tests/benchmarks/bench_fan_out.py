"""Fan-out vs inline: one bulk job of 20 parents x 100 descendants on a 4-worker qcluster.

``python -m tests.benchmarks fan_out [--stack=embedded|redis-postgres] [--quick]``

One job (launched by powercrud's ``AsyncManager``) launches a nested job per parent; each nested
job stands for 100 descendants of ~20 ms of I/O-like work each (one sleep of 2 s; ``--quick``:
5 parents x 20 descendants). The same job runs twice in one run, on a fresh 4-worker cluster
each time:

* **inline** (the default policy): every nested job runs in the job's worker, one after the
  other;
* **fan-out** (``OTEL_TASKCTX["FAN_OUT"]``): every nested job is a child job on any worker,
  and powercrud's completion of the job waits for the last one.

Reported: the wall time from the launch to powercrud's completion (its progress key removed)
and the fan-out/inline ratio (target <= 0.35x; ideal 0.25x with 4 workers); the barrier's own
cost per child (its row written at the launch, and at its end through the real hook: its state
recorded and the job's readiness checked; measured in this process on the benchmark's
store, per child: Redis on the Redis stack, the database on the embedded one), next to one
write to the same store (a committed single-row ORM update, or a Redis SET), the unit the
barrier is made of; jobs whose completion came before one of their
descendants ended (target 0); locks left (target 0). SQLite runs with the sample's PRAGMAs
(WAL, ``synchronous=NORMAL``; ``TASKCTX_SQLITE_INIT`` overrides them).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

from tests.benchmarks._util import run_child, table

PARENT = "tests.testapp.fan_out.fan_parent"
CHILD = "tests.testapp.fan_out.fan_child"
RESULT_TAG = "FAN_OUT_RESULT "
TARGET_RATIO, TARGET_BARRIER_MS = 0.35, 2.0
SQLITE_INIT = "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"


def _option(argv: list[str], name: str, default: str | None = None) -> str | None:
    return next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")), default)


def _run_policy(policy: str, parents: int, descendants: int, work_ms: float) -> dict:
    from powercrud.async_manager import AsyncManager

    from tests.cluster import run_cluster

    settings = {"OTEL_TASKCTX": {"FAN_OUT": [CHILD]} if policy == "fan-out" else {}}
    marker_dir = Path(tempfile.mkdtemp(prefix=f"fan-out-{policy}-"))
    groups = [list(range(p * descendants + 1, (p + 1) * descendants + 1)) for p in range(parents)]
    manager = AsyncManager()
    with run_cluster(q_cluster={"workers": 4, "timeout": 600, "retry": 900}, settings=settings):
        started = time.monotonic()
        key = manager.launch_async_task(
            PARENT, policy, groups, str(marker_dir), descendants * work_ms / 1000
        )
        while manager.get_progress(key) is not None:
            time.sleep(0.02)
        completed = time.time()
        wall = time.monotonic() - started
    ends = [
        json.loads((marker_dir / f"{policy}-{n}.json").read_text())["end"] for n in range(parents)
    ]
    ids = [i for g in groups for i in g]
    return {
        "wall_s": wall,
        "early": int(completed < max(ends)),
        "locks_left": len(manager.check_conflict({"testapp.child": ids})),
    }


def _barrier_ms(children: int = 200) -> float:
    """The barrier's own work per child, on this run's store (Redis or the database)."""
    from django_q.models import Task
    from opentelemetry.instrumentation.taskctx import barrier, fan_out

    job = str(uuid.uuid4())  # a job key as powercrud makes them
    Task.objects.filter(name=job).delete()
    start = time.perf_counter()
    names = [barrier.child_name(job) for _ in range(children)]
    for name in names:  # launch side: the pending record
        barrier.add_child(job, name, CHILD)
    # the job's function ends (its end is recorded) while its children still run
    barrier.job_ended(job, PARENT)
    for name in names[:-1]:  # each child's hook but the last, as django-q2 calls it
        fan_out.child_done(SimpleNamespace(name=name, success=True, result=1, func=CHILD))
    elapsed = time.perf_counter() - start
    barrier.discard(job)
    return elapsed * 1000 / children


def _write_ms(count: int = 200) -> float:
    """One write to the barrier's store, the unit the barrier is made of: a Redis SET where
    the barrier lives in Redis, else a committed single-row update through the ORM."""
    from django.utils import timezone
    from opentelemetry.instrumentation.taskctx import barrier

    from otel_taskctx.models import FanOutChild

    redis = barrier.store()
    if isinstance(redis, barrier.RedisBarrier):
        client, key = redis._redis(), f"bench-write-{time.time_ns()}"
        start = time.perf_counter()
        for n in range(count):
            client.set(key, n)
        elapsed = time.perf_counter() - start
        client.delete(key)
        return elapsed * 1000 / count
    row = FanOutChild.objects.create(job_key=f"bench-write-{time.time_ns()}", task_id="w")
    rows = FanOutChild.objects.filter(pk=row.pk)
    start = time.perf_counter()
    for _ in range(count):
        rows.update(finished_at=timezone.now())
    elapsed = time.perf_counter() - start
    row.delete()
    return elapsed * 1000 / count


def run_stack(stack: str, quick: bool) -> dict:
    from tests.benchmarks.bench_jobs import prepare_environment, quiet_logging, setup_database

    # SQLite as the sample configures it (WAL, synchronous=NORMAL): a commit without fsync
    os.environ.setdefault("TASKCTX_SQLITE_INIT", SQLITE_INIT)
    prepare_environment(stack, "fan-out")
    setup_database()
    quiet_logging()
    parents, descendants = (5, 20) if quick else (20, 100)
    result = {p: _run_policy(p, parents, descendants, 20.0) for p in ("inline", "fan-out")}
    result["barrier_ms"] = statistics.median(_barrier_ms() for _ in range(5))
    result["write_ms"] = statistics.median(_write_ms() for _ in range(5))
    result["shape"] = f"{parents} parents x {descendants} descendants x 20 ms"
    return result


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    stack = _option(argv, "stack")
    if _option(argv, "child"):
        print(RESULT_TAG + json.dumps(run_stack(stack or "embedded", quick)), flush=True)
        return 0
    rows, ok = [], True
    for name in [stack] if stack else ["embedded", "redis-postgres"]:
        r = run_child(
            "tests.benchmarks.bench_fan_out", name, RESULT_TAG, *(["--quick"] if quick else [])
        )
        if r is None:
            return 1
        ratio = r["fan-out"]["wall_s"] / r["inline"]["wall_s"]
        early = r["inline"]["early"] + r["fan-out"]["early"]
        locks = r["inline"]["locks_left"] + r["fan-out"]["locks_left"]
        met = (
            ratio <= TARGET_RATIO
            and r["barrier_ms"] < TARGET_BARRIER_MS
            and not early
            and not locks
        )
        ok = ok and met
        rows.append(
            [
                "ORM broker (SQLite)" if name == "embedded" else "Redis + PostgreSQL",
                f"{r['inline']['wall_s']:.2f}",
                f"{r['fan-out']['wall_s']:.2f}",
                f"{ratio:.2f}x",
                f"{r['barrier_ms']:.2f}",
                f"{r['write_ms']:.2f}",
                f"{r['barrier_ms'] / r['write_ms']:.1f}",
                str(early),
                str(locks),
                "yes" if met else "NO",
            ]
        )
        shape = r["shape"]
    print()
    print(
        table(
            [
                "broker",
                "inline s",
                "fan-out s",
                "ratio (<= 0.35x)",
                "barrier ms/child (< 2)",
                "1 write ms",
                "barrier/write",
                "ended early",
                "locks left",
                "targets met",
            ],
            rows,
        )
    )
    print(f"{shape}; one job, 4 workers; wall: launch -> powercrud's completion")
    print(
        "barrier: its work per child (database: 2 committed writes and 1 read; Redis: 2 round "
        "trips); 1 write: one committed single-row ORM update, or one Redis SET, on the "
        "barrier's store; SQLite with the sample's PRAGMAs (WAL, synchronous=NORMAL)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
