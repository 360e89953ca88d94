"""The Celery benchmarks' worker and environment: the test suite's real ``celery worker``
(``tests.celery_worker.run_worker``, prefork) running :mod:`tests.benchmarks.celery_bench_tasks`,
its CPU read from ``/proc``; a variant's producer and worker share one environment and one set
of settings overrides."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
TASKS = "tests.benchmarks.celery_bench_tasks"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_OURS = ("OTEL_", "BENCH_", "TASKCTX_CELERY_", "TASKCTX_NO_PROVIDER", "TASKCTX_RUN_DIR")


def variant_env(
    run_dir: Path, db: str, broker: str, otel_celery: bool, otel_taskctx: dict
) -> dict[str, str]:
    """One variant's environment, for its producer and its worker alike: ``broker`` as the
    test settings take it (``filesystem`` in ``run_dir``, or ``redis``: DB
    ``TASKCTX_REDIS_DB`` + 1), an SDK tracer provider and opentelemetry-instrumentation-celery
    (``otel_celery``) or no provider, ``OTEL_TASKCTX`` from ``otel_taskctx``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_OURS)}
    env.update(
        DJANGO_SETTINGS_MODULE="tests.settings",
        TASKCTX_STACK="embedded",
        TASKCTX_DB_NAME=db,
        TASKCTX_RUN_DIR=str(run_dir),
        TASKCTX_CELERY_BROKER=broker,
        TASKCTX_TEST_OTEL_TASKCTX=json.dumps(otel_taskctx),
        PYTHONPATH=str(REPO_ROOT),
        PYTHONUNBUFFERED="1",
    )
    env.update({"TASKCTX_CELERY_OTEL": "after"} if otel_celery else {"TASKCTX_NO_PROVIDER": "1"})
    return env


def overrides() -> dict[str, Any]:
    """Settings of the producer and the worker: the benchmark's tasks (on the test settings'
    broker, whose filesystem transport writes each message whole)."""
    from django.conf import settings

    return {"CELERY_IMPORTS": [*settings.CELERY_IMPORTS, TASKS]}


def setup_producer() -> dict[str, Any]:
    """This process as the worker is (``tests.celery_worker.main``): the overrides, tracing,
    Django, opentelemetry-instrumentation-celery after it where the variant has it."""
    from django.conf import settings

    values = overrides()
    for name, value in values.items():
        setattr(settings, name, value)
    from tests.cluster import _setup_tracing

    _setup_tracing()
    import django

    django.setup()
    if os.environ.get("TASKCTX_CELERY_OTEL") == "after":
        from opentelemetry.instrumentation.celery import CeleryInstrumentor

        CeleryInstrumentor().instrument()
    return values


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds) of a live process, from ``/proc/<pid>/stat``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def tree_cpu(root: int) -> float:
    """CPU seconds (user + system) of ``root`` and its live descendants."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            stats[int(entry.name)] = stat
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _) in stats.items():
            if ppid == parent and pid not in tree:
                tree.add(pid)
                frontier.append(pid)
    return sum(stats[pid][1] for pid in tree if pid in stats)


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.01)


@contextmanager
def bench_worker(concurrency: int, settings: dict[str, Any]) -> Iterator[Any]:
    """``tests.celery_worker.run_worker`` with the benchmark's settings, once it has run a
    first task (its pool processes warm)."""
    from tests.benchmarks.celery_bench_tasks import mark
    from tests.celery_worker import run_worker

    with run_worker(concurrency=concurrency, settings=settings) as worker:
        ready = Path(tempfile.mkdtemp(prefix="bench-celery-")) / "ready.json"
        mark.delay(str(ready))
        worker.wait_for(ready.exists, timeout=120, what="the worker's first task")
        yield worker
