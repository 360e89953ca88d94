"""End-to-end nested bulk edit on Redis + PostgreSQL: otel_taskctx's inline path vs
powercrud's manual pattern, in the same run.

``python -m tests.benchmarks bulk_edit [--quick] [--parents=N] [--children=N] [--rounds=N]``

One bulk-edit job (launched by ``AsyncManager.launch_async_task`` with the parents locked)
approves 1,000 parents; each parent's save path updates the parent and its 10 children in one
transaction, registering the children as descendants first. The job runs in a fresh 2-worker
qcluster (Redis broker), on a fresh PostgreSQL database, with the locks in a django-redis cache.

* **powercrud manual pattern** (baseline): the code every project writes by hand today. The
  worker is not instrumented; the job function enters ``powercrud.async_context.task_context``
  itself, and the save path asks ``skip_nested_async()``, calls
  ``register_descendant_conflicts("testapp.Child", ids)`` and updates the children inline.
* **otel_taskctx inline**: the save path is unchanged powercrud-style code that always calls
  ``AsyncManager().launch_async_task(update_children, ..., conflict_ids=...)``; the
  instrumentation runs it inline under the job's key and reserves the children atomically in
  one round trip (no SDK: spans are not recorded).
* **otel_taskctx inline, full**: the same with the OpenTelemetry SDK, our span processor and the
  span store on (the defaults).

Measured: the job's run time (django-q2's ``started`` -> ``stopped``), the end-to-end time
(launch -> result recorded and every lock released by the completion hook), the worker's peak
RSS and its growth during the job (``ru_maxrss``), cache round trips made by the job (requests
the worker's redis-py connections sent while it ran: a pipeline or a Lua script is one) and the
commands the cache server executed during the whole run (launch, job, completion hook; ``INFO
commandstats`` delta of a private ``redis-server``, commands inside Lua scripts included).
Target (issue 7): the inline path's wall time within 1.1x of the manual pattern's.
"""

from __future__ import annotations

import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.benchmarks._util import table

TARGET = 1.1
MANAGER = "powercrud.async_manager.AsyncManager"
HERE = "tests.benchmarks.bench_bulk_edit"
_OFF = {"SPAN_PROCESSOR": False, "SPAN_STORE": False, "EXPORT_FROM_ENV": False}
#: name -> (job function, OTEL_TASKCTX of the cluster, instrument this process, SDK here)
VARIANTS = {
    "powercrud manual pattern": (f"{HERE}.manual_bulk_edit", {"AUTO_INSTRUMENT": False, **_OFF}),
    "otel_taskctx inline": (f"{HERE}.inline_bulk_edit", dict(_OFF)),
    "otel_taskctx inline, full": (f"{HERE}.inline_bulk_edit", {}),
}
BASELINE = "powercrud manual pattern"
TARGETED = "otel_taskctx inline"


# --------------------------------------------------------------------------- the jobs


class _Meter:
    """Counts redis-py requests sent by this process and samples ``ru_maxrss``."""

    def __init__(self) -> None:
        from redis.connection import AbstractConnection

        self.cls = AbstractConnection
        self.original = AbstractConnection.send_packed_command
        self.requests = 0
        self.rss_start_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        meter = self

        def send_packed_command(conn, command, check_health=True):
            meter.requests += 1
            return meter.original(conn, command, check_health)

        AbstractConnection.send_packed_command = send_packed_command

    def stop(self) -> dict[str, Any]:
        self.cls.send_packed_command = self.original
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {
            "cache_requests": self.requests,
            "peak_rss_kb": peak,
            "rss_growth_kb": peak - self.rss_start_kb,
        }


def manual_bulk_edit(parent_ids, status, task_key=None, manager_class=None, **kwargs):
    """powercrud's manual pattern: the worker function enters the task context itself."""
    from powercrud.async_context import task_context

    from tests.testapp.models import Parent

    meter = _Meter()
    with task_context(task_key, manager_class):
        for parent in Parent.objects.filter(pk__in=parent_ids).order_by("pk"):
            manual_save_parent(parent, status)
    return meter.stop()


def manual_save_parent(parent, status) -> None:
    """A save path written for powercrud's ``async_context`` helpers."""
    from django.db import transaction
    from powercrud import async_context as pc
    from powercrud.async_manager import AsyncManager

    from tests.testapp.reliability import NESTED_CHILDREN, update_children

    with transaction.atomic():
        parent.status = status
        parent.save(update_fields=["status"])
        child_ids = list(parent.children.values_list("pk", flat=True))
        if pc.skip_nested_async():
            pc.register_descendant_conflicts("testapp.Child", child_ids)
            update_children(parent.pk, status, task_key=pc.get_current_task().task_name)
        else:
            AsyncManager().launch_async_task(
                NESTED_CHILDREN, parent.pk, status, conflict_ids={"testapp.child": set(child_ids)}
            )


def inline_bulk_edit(parent_ids, status, task_key=None, **kwargs):
    """Unchanged powercrud-style code: every save launches its nested job (run inline)."""
    from tests.testapp.models import Parent
    from tests.testapp.reliability import save_parent

    meter = _Meter()
    for parent in Parent.objects.filter(pk__in=parent_ids).order_by("pk"):
        save_parent(parent, status)
    return meter.stop()


# --------------------------------------------------------------------------- the runner


def _commands(client) -> int:
    """Commands the server executed, except this benchmark's own INFO and KEYS polling."""
    stats = client.info("commandstats")
    mine = ("cmdstat_info", "cmdstat_keys")
    return sum(v["calls"] for k, v in stats.items() if not k.startswith(mine))


def _locks_left(client) -> bool:
    return bool(client.keys("*powercrud:conflict*"))


def _run(variant: str, parent_ids: list[int], status: str, servers: dict[str, Any]) -> dict:
    import redis
    from django.core.cache import cache
    from django_q.models import Task
    from powercrud.async_manager import AsyncManager

    from tests.benchmarks.bench_jobs import (
        set_local_instrumentation,
        set_local_span_store,
        wait_until,
    )
    from tests.cluster import run_cluster

    func, otel = VARIANTS[variant]
    local = variant != BASELINE
    set_local_instrumentation(local, sdk=otel.get("SPAN_PROCESSOR", True))
    set_local_span_store(otel.get("SPAN_STORE", True) and local)
    settings = {
        "OTEL_TASKCTX": dict(otel),
        "CACHES": {"default": servers["cache_config"]},
        "Q_CLUSTER": {"redis": servers["broker_url"]},
    }
    client = redis.Redis.from_url(servers["cache_url"])
    with run_cluster(
        q_cluster={"workers": 2, "timeout": 1800, "retry": 1900}, settings=settings
    ) as cluster:
        before = _commands(client)
        start = time.perf_counter()
        key = AsyncManager().launch_async_task(
            func,
            parent_ids,
            status,
            conflict_ids={"testapp.parent": set(parent_ids)},
            manager_class=MANAGER,
            timeout=1800,
        )
        task = wait_until(
            lambda: Task.objects.filter(name=key).first(), 1800, interval=0.05, what="the job"
        )
        recorded = time.perf_counter() - start
        wait_until(lambda: not _locks_left(client), 600, interval=0.05, what="the locks to go")
        end_to_end = time.perf_counter() - start
        commands = _commands(client) - before
        assert cluster.alive
    if not task.success:
        raise RuntimeError(f"{variant}: the job failed: {str(task.result)[:2000]}")
    cache.clear()
    return {
        "job_s": (task.stopped - task.started).total_seconds(),
        "recorded_s": recorded,
        "end_to_end_s": end_to_end,
        "server_commands": commands,
        **task.result,
    }


def _check(parent_ids: list[int], status: str) -> None:
    from tests.testapp.models import Child, Parent

    assert set(Parent.objects.filter(pk__in=parent_ids).values_list("status", flat=True)) == {
        status
    }
    assert set(Child.objects.filter(parent_id__in=parent_ids).values_list("status", flat=True)) == {
        status
    }


def main(argv: list[str]) -> int:
    """Runs the benchmark in a child process: it needs its own Django settings (Redis +
    PostgreSQL), whatever the benchmarks run before it in this process set up."""
    import os
    import subprocess

    from tests.benchmarks.bench_jobs import _option

    if _option(argv, "child"):
        return _run_child(argv)
    env = {k: v for k, v in os.environ.items() if k not in ("TASKCTX_STACK", "TASKCTX_DB_NAME")}
    return subprocess.run(
        [sys.executable, "-m", "tests.benchmarks.bench_bulk_edit", "--child=1", *argv], env=env
    ).returncode


def _run_child(argv: list[str]) -> int:
    from tests.benchmarks.bench_jobs import _option, prepare_environment
    from tests.reliability import RedisServer

    quick = "--quick" in argv
    parents = int(_option(argv, "parents", "200" if quick else "1000"))
    children = int(_option(argv, "children", "10"))
    rounds = int(_option(argv, "rounds", "1" if quick else "3"))

    work = Path(tempfile.mkdtemp(prefix="bench-bulk-edit-"))
    servers = {"cache": RedisServer(work / "cache"), "broker": RedisServer(work / "broker")}
    try:
        prepare_environment("redis-postgres", "bulk-edit")
        from django.conf import settings

        cache_config = {
            **servers["cache"].cache_config(),
            "OPTIONS": {"CLIENT_CLASS": "django_redis.client.DefaultClient"},
        }
        settings.CACHES = {**settings.CACHES, "default": cache_config}
        settings.Q_CLUSTER = {**settings.Q_CLUSTER, "redis": servers["broker"].url}
        from tests.benchmarks.bench_jobs import setup_database

        setup_database()
        from tests.testapp.models import Child, Parent

        Parent.objects.bulk_create(Parent(name=f"P{n}") for n in range(parents))
        parent_ids = list(Parent.objects.order_by("pk").values_list("pk", flat=True))
        Child.objects.bulk_create(Child(parent_id=p) for p in parent_ids for _ in range(children))
        info = {
            "cache_config": cache_config,
            "cache_url": servers["cache"].url,
            "broker_url": servers["broker"].url,
        }
        results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
        n = 0
        for r in range(rounds):
            order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
            for variant in order:
                n += 1
                status = f"s{n}"
                results[variant].append(_run(variant, parent_ids, status, info))
                _check(parent_ids, status)
                print(
                    f"  round {r + 1}/{rounds} {variant}: "
                    f"job {results[variant][-1]['job_s']:.2f}s, "
                    f"end to end {results[variant][-1]['end_to_end_s']:.2f}s",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        for server in servers.values():
            server.kill()

    def med(variant: str, field: str) -> float:
        return statistics.median(run[field] for run in results[variant])

    rows, ok = [], True
    base_job, base_e2e = med(BASELINE, "job_s"), med(BASELINE, "end_to_end_s")
    for variant in VARIANTS:
        job, e2e = med(variant, "job_s"), med(variant, "end_to_end_s")
        verdict = ""
        if variant == TARGETED or variant.endswith("full"):
            passed = job / base_job <= TARGET
            verdict = "yes" if passed else "NO"
            if variant == TARGETED:
                ok = ok and passed
        rows.append(
            [
                variant,
                f"{job:.2f}",
                f"{job / base_job:.2f}x",
                verdict,
                f"{e2e:.2f}",
                f"{e2e / base_e2e:.2f}x",
                f"{med(variant, 'peak_rss_kb') / 1024:.0f} / +{med(variant, 'rss_growth_kb') / 1024:.1f}",
                f"{med(variant, 'cache_requests'):.0f}",
                f"{med(variant, 'server_commands'):.0f}",
            ]
        )
    print(
        table(
            [
                f"{parents} parents x {children} children",
                "job s",
                "ratio",
                f"<= {TARGET}x",
                "end-to-end s",
                "ratio",
                "worker peak RSS MB / growth",
                "cache round trips (job)",
                "cache commands (server)",
            ],
            rows,
        )
    )
    print(
        f"medians of {rounds} round(s); Redis broker + PostgreSQL, 2 workers; job: django-q2 "
        "started -> stopped; end-to-end: launch -> result recorded and every lock released"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
