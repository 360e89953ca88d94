"""Per-job overhead: enqueue -> done for small jobs through a real qcluster.

``python -m tests.benchmarks jobs [--quick] [--breakdown] [--stack=embedded|redis-postgres]
[--jobs=N] [--rounds=N] [--span-rows=N|grow]``

For each broker, in the same run and on the same database, a batch of small jobs (``noop``,
launched by powercrud's ``AsyncManager.launch_async_task``, so each has its task key,
progress key and completion hook) goes through a fresh 2-worker qcluster:

* **uninstrumented** (baseline): ``OTEL_TASKCTX`` with ``AUTO_INSTRUMENT``,
  ``SPAN_PROCESSOR``, ``SPAN_STORE`` and ``EXPORT_FROM_ENV`` off, in the cluster and in this
  (enqueuing) process;
* **+ span store (full)**: the defaults: the instrumentation, the OpenTelemetry SDK, our span
  processor and the span store writing every span to the database. This is the
  configuration the target is about. On SQLite the span table is in a file of its own
  (``OTEL_TASKCTX["SPAN_DATABASE"]`` with ``SpanStoreRouter``, as the sample and
  ``docs/performance.md`` recommend).

``--breakdown`` adds the steps in between (and costs a run three times as long):

* **instrumentation, no SDK**: the instrumentation only (signed identity in every package,
  powercrud's context in the worker; spans are non-recording without an SDK);
* **same, no lock refresher**: ``LOCK_REFRESH_INTERVAL = 0`` (no task registered with the
  process's lock refresher; locks then live for their TTL from the moment they were taken);
* **+ SDK + span processor**: also the SDK and our span processor (spans are recorded,
  nothing exported);
* SQLite only, **span store in the jobs' file**: the full configuration with the span table
  in the file the ORM broker and the jobs write (one writer at a time in SQLite).

Time is measured from the first enqueue until django-q2 has recorded the last result
(``Task`` rows). Every round runs each variant once, in alternating order; a variant's ratio
in a round is its time over the baseline's time in that same round (paired: the machine's
drift between rounds cancels out). The table shows the median ratio over the rounds with
its range, and the median per-job times. Target (issue 7): overhead below 5% (median paired
ratio < 1.05). The CPU columns are the whole machine's busy CPU time (``/proc/stat``: every
process, PostgreSQL and Redis included) per job over the same interval, and its paired
ratio: less noisy than wall time, and what a busier machine would feel. **launch CPU** is the
enqueuing thread's own CPU time per ``launch_async_task`` (``time.thread_time``): on the ORM
broker the launches are the slowest stage of the pipeline (enqueuing a batch takes most of its
time), so what the instrumentation adds there shows up almost whole in the wall time.

**The span table.** What a span's write costs can depend on how many spans the table
already holds (with indexes led by random keys, each new row dirtied a page of its own in each
of them once they were larger than a batch; the keys now lead with the hour, see
``docs/performance.md``). A
deployment keeps the spans of many past jobs, so every batch of the full variant starts with
``--span-rows`` spans of past jobs in the table (default 100,000: a day of a small
deployment; filled once per run, and the spans of earlier batches are deleted before each
batch, so every round measures the same table). ``--span-rows=0`` measures an empty table
and ``--span-rows=grow`` the earlier behaviour (a table that grows from empty through the run,
which makes the later rounds costlier than the first).

Brokers: the ORM broker (``embedded`` stack: SQLite + DatabaseCache) and the Redis broker
(``redis-postgres`` stack: PostgreSQL + django-redis). Each stack runs in a child process
(Django settings are per process). Databases are created for the run: temporary SQLite
files, a fresh PostgreSQL database ``taskctx_bench_jobs``. SQLite runs in WAL mode with SQLite's default
``synchronous``; ``TASKCTX_SQLITE_INIT`` (e.g. ``"PRAGMA synchronous=NORMAL;"``, as the sample
configures its files) sets per-connection PRAGMAs for the enqueuing process and the cluster.
Redis: database ``TASKCTX_REDIS_DB`` (default 14 for benchmarks; the broker uses the next one).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

from tests.benchmarks._util import run_child, table

TARGET = 1.05
STACKS = {"embedded": "ORM broker (SQLite)", "redis-postgres": "Redis broker (PostgreSQL)"}
_OFF = {"SPAN_PROCESSOR": False, "SPAN_STORE": False, "EXPORT_FROM_ENV": False}
#: name -> (OTEL_TASKCTX of the cluster, instrument this process); the first is the baseline,
#: the last is the configuration the target is about
VARIANTS = {
    "uninstrumented": ({"AUTO_INSTRUMENT": False, **_OFF}, False),
    "instrumentation, no SDK": (dict(_OFF), True),
    "  same, no lock refresher": ({**_OFF, "LOCK_REFRESH_INTERVAL": 0}, True),
    "+ SDK + span processor": ({"SPAN_STORE": False, "EXPORT_FROM_ENV": False}, True),
    "+ span store (full)": ({}, True),
}
#: SQLite only: the span table in the jobs' own database file
SAME_FILE = "  span store in the jobs' file"
SQLITE_VARIANTS = {**VARIANTS, SAME_FILE: ({"SPAN_DATABASE": None}, True)}
BASELINE, FULL = "uninstrumented", "+ span store (full)"
STORE_VARIANTS = (FULL, SAME_FILE)
#: what runs without --breakdown: the comparison the target is about
TARGET_VARIANTS = (BASELINE, FULL)
RESULT_TAG = "BENCH_RESULT "


def _option(argv: list[str], name: str, default: str | None = None) -> str | None:
    for arg in argv:
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return default


# --------------------------------------------------------------------------- set-up


def prepare_environment(stack: str, db_label: str, redis_db: str = "14") -> str:
    """Point this process (before Django starts) at a fresh database for the benchmark."""
    os.environ["TASKCTX_STACK"] = stack
    os.environ.setdefault("TASKCTX_INSTANCE", f"bench-{db_label}")
    os.environ.setdefault("TASKCTX_REDIS_DB", redis_db)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    if stack == "embedded":
        folder = tempfile.mkdtemp(prefix=f"bench-{db_label}-")
        name = os.path.join(folder, "bench.sqlite3")
        os.environ["TASKCTX_SPAN_DB"] = os.path.join(folder, "spans.sqlite3")
    else:
        import psycopg

        name = f"taskctx_bench_{db_label}".replace("-", "_")
        with psycopg.connect(
            host=os.environ.get("TASKCTX_PG_HOST", "127.0.0.1"),
            port=os.environ.get("TASKCTX_PG_PORT", "5432"),
            user=os.environ.get("TASKCTX_PG_USER", "postgres"),
            dbname="postgres",
            autocommit=True,
        ) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
    os.environ["TASKCTX_DB_NAME"] = name
    return name


def setup_database() -> None:
    import django

    django.setup()
    from django.conf import settings
    from django.core.cache import cache
    from django.core.management import call_command

    configured = settings.OTEL_TASKCTX
    # the span table in the jobs' database too (the "jobs' file" variant writes there)
    settings.OTEL_TASKCTX = {k: v for k, v in configured.items() if k != "SPAN_DATABASE"}
    call_command("migrate", verbosity=0)
    settings.OTEL_TASKCTX = configured
    if "spans" in settings.DATABASES:
        call_command("migrate", database="spans", verbosity=0)
    from django.db import connection

    if connection.vendor == "sqlite":
        # WAL, as the sample configures its SQLite files: every variant, the baseline too,
        # runs on the same journal
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA journal_mode = WAL")
    call_command("createcachetable", verbosity=0)
    cache.clear()
    quiet_logging()


def quiet_logging() -> None:
    """django-q2 logs every enqueue and powercrud debug-logs every launch: not what we time."""
    import logging

    for name in ("django-q", "powercrud"):
        logging.getLogger(name).setLevel(logging.WARNING)


def set_local_instrumentation(on: bool, sdk: bool = True) -> None:
    """Instrument (or not) this process, the producer side of every job; ``sdk=False``: with a
    no-op tracer provider, as in a process without the SDK."""
    from opentelemetry import trace
    from opentelemetry.instrumentation.taskctx import TaskContextInstrumentor

    instrumentor = TaskContextInstrumentor()
    if instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.uninstrument()
    if on:
        instrumentor.instrument(**({} if sdk else {"tracer_provider": trace.NoOpTracerProvider()}))


def set_local_span_store(on: bool) -> None:
    """Spans of this process go to the span store only in the full variant.

    (Benchmark only: takes the store's two processors out of the SDK provider's list.)
    """
    from otel_taskctx.spans.store import RUNNING, STORE
    from otel_taskctx.tracer_provider import added_processors, sdk_tracer_provider

    provider = sdk_tracer_provider()  # the host's, or otel_taskctx's private one
    if provider is None:
        return
    marks = added_processors(provider)
    store = [marks.get(STORE), marks.get(RUNNING)]
    multi = provider._active_span_processor
    if not hasattr(multi, "_bench_all"):
        multi._bench_all = multi._span_processors
    if on:
        multi._span_processors = multi._bench_all
    else:
        multi._span_processors = tuple(p for p in multi._bench_all if p not in store)


def wait_until(predicate, timeout: float, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


#: span rows already in the store when a batch starts (``--span-rows``)
DEFAULT_SPAN_ROWS = 100_000
#: ``(database alias, highest filler id)`` of each span table filled for this run
_FILLED: dict[str, int] = {}


def fill_span_table(using: str, rows: int) -> None:
    """Put ``rows`` spans of past jobs in the span table (once per database and run).

    A deployment's span table holds the spans of many past jobs (here spread over the past
    day, as a day's would be), and what a span's write costs can depend on it. Every round
    starts from the same table (see :func:`reset_span_table`), so rounds stay comparable.
    """
    import random
    import uuid
    from datetime import UTC, datetime, timedelta

    from otel_taskctx.models import TaskSpan

    if using in _FILLED:
        return
    TaskSpan.objects.using(using).all().delete()
    start = datetime.now(tz=UTC) - timedelta(days=1)
    step_ns = 86_400 * 10**9 // max(1, rows)
    base_ns = int(start.timestamp() * 10**9)
    attributes = {
        "messaging.system": "django_q2",
        "messaging.operation.type": "process",
        "taskctx.func": "tests.testapp.tasks.noop",
        "taskctx.depth": 0,
        "taskctx.manager_class_path": "powercrud.async_manager.AsyncManager",
    }
    batch: list[TaskSpan] = []
    for n in range(rows):
        # job after job, as the benchmark's own: an enqueue (PRODUCER) and a run (CONSUMER)
        producer = n % 2 == 0
        if producer:
            key = str(uuid.uuid4())
            trace_id = f"{random.getrandbits(128):032x}"
            parent = ""
        at = base_ns + n * step_ns
        span_id = f"{random.getrandbits(64):016x}"
        batch.append(
            TaskSpan(
                trace_id=trace_id,
                span_id=span_id,
                parent_span_id=parent,
                name=("send " if producer else "process ") + "tests.testapp.tasks.noop",
                kind="PRODUCER" if producer else "CONSUMER",
                start_ns=at,
                end_ns=at + 2_000_000,
                started_at=datetime.fromtimestamp(at / 1e9, tz=UTC),
                status="unset" if producer else "ok",
                attributes=(
                    {"taskctx.launched_task_key": key}
                    if producer
                    else {**attributes, "taskctx.task_key": key}
                ),
                task_key=key,
                root_task_key=key,
                manager="" if producer else "powercrud.async_manager.AsyncManager",
                service="bench",
                process="bench:1",
            )
        )
        parent = span_id
        if len(batch) == 5000:
            TaskSpan.objects.using(using).bulk_create(batch)
            batch = []
    if batch:
        TaskSpan.objects.using(using).bulk_create(batch)
    top = TaskSpan.objects.using(using).order_by("-id").values_list("id", flat=True).first()
    _FILLED[using] = top or 0


def reset_span_table(using: str) -> None:
    """Back to the filler rows: the spans of the previous batches go."""
    from otel_taskctx.models import TaskSpan

    if using in _FILLED:
        TaskSpan.objects.using(using).filter(id__gt=_FILLED[using]).delete()


def reset_active_tasks() -> None:
    """Every batch starts with powercrud's set of active tasks empty.

    powercrud keeps the names of running jobs in one cache value
    (``powercrud:async:active_tasks``) that each launch and each completion hook reads,
    changes and writes back. The enqueuing process and the monitor do that at the same time,
    so some removals are lost (4,972 of ~31,000 jobs in a 30-round run here) and the set keeps
    growing: every launch then reads and writes all of it (258 KB at the end of that run), and
    the per-job time grew from 8 to 15 ms over the run, in both variants alike. (powercrud's
    behaviour, with or without the instrumentation; see docs/performance.md. The ``lost``
    column counts a batch's jobs left in the set.)
    """
    from powercrud.async_manager import AsyncManager

    manager = AsyncManager()
    manager.cache.delete(manager.active_prefix)


# --------------------------------------------------------------------------- one stack


def variants_of(stack: str, breakdown: bool = True) -> dict[str, tuple[dict[str, Any], bool]]:
    variants = SQLITE_VARIANTS if stack == "embedded" else VARIANTS
    if breakdown:
        return variants
    return {name: variants[name] for name in TARGET_VARIANTS}


def machine_busy_seconds() -> float | None:
    """CPU time every processor of the machine spent busy so far (Linux ``/proc/stat``)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:8]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _batch(jobs: int, variant: str, span_rows: int | None = None) -> dict[str, float]:
    from django.conf import settings as django_settings
    from django_q.models import Task
    from powercrud.async_manager import AsyncManager

    from tests.cluster import run_cluster

    cluster_settings, local = SQLITE_VARIANTS[variant]
    settings = {"OTEL_TASKCTX": dict(cluster_settings)}
    set_local_instrumentation(local, sdk=cluster_settings.get("SPAN_PROCESSOR", True))
    set_local_span_store(variant in STORE_VARIANTS)
    # this process's spans go where the cluster's go
    django_settings.OTEL_TASKCTX = {**_LOCAL_SETTINGS, **cluster_settings}
    if span_rows is not None and variant in STORE_VARIANTS:
        from django.db import router

        from otel_taskctx.models import TaskSpan

        using = router.db_for_write(TaskSpan)  # under the variant's settings set above
        fill_span_table(using, span_rows)
        reset_span_table(using)
    reset_active_tasks()
    q_cluster = {"workers": 2, "save_limit": 0, "ack_failures": True}
    with run_cluster(q_cluster=q_cluster, settings=settings) as cluster:
        manager = AsyncManager()
        warm = [manager.launch_async_task("tests.testapp.tasks.noop", n) for n in range(10)]
        wait_until(
            lambda: Task.objects.filter(name__in=warm).count() == len(warm), 60, what="warm-up"
        )
        # the batch is done when the table has ``jobs`` more rows: a plain count, cheaper to
        # poll than looking the batch's names up (the poll runs on the measured machine too)
        recorded_before = Task.objects.count()
        enqueued_at: dict[str, float] = {}
        launch_cpu_s = 0.0
        busy_before = machine_busy_seconds()
        start = time.perf_counter()
        for n in range(jobs):
            at = time.time()
            cpu_at = time.thread_time()
            enqueued_at[manager.launch_async_task("tests.testapp.tasks.noop", n)] = at
            launch_cpu_s += time.thread_time() - cpu_at
        enqueue_s = time.perf_counter() - start
        names = list(enqueued_at)
        wait_until(
            lambda: Task.objects.count() >= recorded_before + jobs,
            timeout=600,
            what=f"{jobs} jobs",
        )
        total_s = time.perf_counter() - start
        busy_after = machine_busy_seconds()
        stopped = dict(Task.objects.filter(name__in=names).values_list("name", "stopped"))
        assert len(stopped) == jobs, f"{jobs - len(stopped)} results missing"
        latencies = [stopped[k].timestamp() - t for k, t in enqueued_at.items()]
        assert cluster.alive
        left = len(manager.get_active_tasks() & set(names))
    Task.objects.all().delete()
    return {
        "per_job_ms": total_s * 1000 / jobs,
        "enqueue_ms": enqueue_s * 1000 / jobs,
        "launch_cpu_ms": launch_cpu_s * 1000 / jobs,
        "latency_ms": statistics.median(latencies) * 1000,
        "total_s": total_s,
        "cpu_ms": (busy_after - busy_before) * 1000 / jobs if busy_before is not None else 0.0,
        "active_left": float(left),
    }


#: this process's OTEL_TASKCTX as the settings module made it
_LOCAL_SETTINGS: dict[str, Any] = {}


def run_stack(
    stack: str,
    jobs: int,
    rounds: int,
    breakdown: bool = False,
    span_rows: int | None = DEFAULT_SPAN_ROWS,
) -> dict[str, Any]:
    prepare_environment(stack, "jobs")
    setup_database()
    from django.conf import settings

    _LOCAL_SETTINGS.update(settings.OTEL_TASKCTX)
    variants = variants_of(stack, breakdown)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    # warm-up (database files, caches, imports, the span table's filler): not counted
    _batch(min(jobs, 100), FULL, span_rows)
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            results[name].append(_batch(jobs, name, span_rows))
            print(
                f"  {stack} round {r + 1}/{rounds} {name}: "
                f"{results[name][-1]['per_job_ms']:.2f} ms/job",
                file=sys.stderr,
                flush=True,
            )
    summary = {}
    for name, runs in results.items():
        summary[name] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        summary[name]["per_job_all"] = [run["per_job_ms"] for run in runs]
        # paired: this variant's time over the baseline's in the same round
        summary[name]["ratios"] = [
            run["per_job_ms"] / base["per_job_ms"]
            for run, base in zip(runs, results[BASELINE], strict=True)
        ]
        summary[name]["cpu_ratios"] = [
            run["cpu_ms"] / base["cpu_ms"] if base["cpu_ms"] else 0.0
            for run, base in zip(runs, results[BASELINE], strict=True)
        ]
    return {"stack": stack, "jobs": jobs, "rounds": rounds, "span_rows": span_rows, **summary}


# --------------------------------------------------------------------------- entry points


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    breakdown = "--breakdown" in argv
    jobs = int(_option(argv, "jobs", "200" if quick else "500"))
    rounds = int(_option(argv, "rounds", "1" if quick else ("5" if breakdown else "9")))
    stack = _option(argv, "stack")
    rows_option = _option(argv, "span-rows", str(DEFAULT_SPAN_ROWS))
    span_rows = None if rows_option == "grow" else int(rows_option)
    if _option(argv, "child"):
        result = run_stack(stack, jobs, rounds, breakdown, span_rows)
        print(RESULT_TAG + json.dumps(result), flush=True)
        return 0
    stacks = [stack] if stack else list(STACKS)
    rows, ok = [], True
    for name in stacks:
        options = [f"--jobs={jobs}", f"--rounds={rounds}", f"--span-rows={rows_option}"]
        result = run_child(
            "tests.benchmarks.bench_jobs",
            name,
            RESULT_TAG,
            *options,
            *(["--breakdown"] if breakdown else []),
        )
        if result is None:
            return 1
        for variant in variants_of(name, breakdown):
            run = result[variant]
            ratios = run["ratios"]
            ratio = statistics.median(ratios)
            cpu_ratio = statistics.median(run["cpu_ratios"])
            verdict = ""
            if variant == FULL:
                verdict = "yes" if ratio < TARGET else "NO"
                ok = ok and ratio < TARGET
            rows.append(
                [
                    STACKS[name] if variant == BASELINE else "",
                    variant,
                    f"{run['per_job_ms']:.2f}",
                    "1.00x (baseline)"
                    if variant == BASELINE
                    else f"{ratio:.3f}x ({(ratio - 1) * 100:+.1f}%)",
                    "" if variant == BASELINE else f"{min(ratios):.2f}-{max(ratios):.2f}",
                    verdict,
                    f"{run['cpu_ms']:.1f}",
                    ""
                    if variant == BASELINE or not cpu_ratio
                    else f"{(cpu_ratio - 1) * 100:+.1f}%",
                    f"{run['latency_ms']:.0f}",
                    f"{run['enqueue_ms']:.2f}",
                    f"{run['launch_cpu_ms']:.2f}",
                    f"{run['active_left']:.0f}",
                    " ".join(f"{v:.1f}" for v in run["per_job_all"]),
                ]
            )
    print(
        table(
            [
                "broker",
                "variant",
                "ms/job",
                "ratio (median)",
                "range",
                f"full < {TARGET}x",
                "CPU ms/job",
                "CPU ratio",
                "latency ms",
                "enqueue ms/job",
                "launch CPU ms",
                "lost",
                "per round",
            ],
            rows,
        )
    )
    filled = (
        "the span table growing from empty through the run"
        if span_rows is None
        else f"every full batch starts with {span_rows:,} spans in the span table"
    )
    print(
        f"{jobs} jobs per batch, {rounds} round(s), {filled}; ms/job: median wall time from the first "
        "enqueue to the last recorded result / jobs (2 workers); ratio: median over the "
        "rounds of the variant's time / the baseline's time in the same round (range: "
        "lowest-highest); CPU: the whole machine's busy CPU time per job over the same "
        "interval (/proc/stat), median, and the median paired ratio to the baseline; "
        "latency: enqueue -> job stopped, median; enqueue: launch_async_task in this process; "
        "launch CPU: this process's CPU time (its calling thread) per launch_async_task; "
        "lost: jobs of the batch still in powercrud's active-task set after all ended "
        "(median; lost updates of that set, emptied before each batch)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
