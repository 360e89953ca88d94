"""The Celery benchmarks' tasks, on the test suite's app (:mod:`tests.celery_app`;
``_celery.py`` adds this module to ``CELERY_IMPORTS``)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tests.celery_app import app


@app.task(name="bench.noop")
def noop(n: int) -> None:
    return None


@app.task(name="bench.mark")
def mark(path: str) -> None:
    """Written after the tasks published before it (one pool process: in order)."""
    Path(path).write_text(json.dumps({"end": time.time()}))


@app.task(name="bench.fan_child")
def fan_child(n: int, seconds: float, marker_dir: str) -> None:
    """A nested child: reserves its descendant (``testapp.Child`` ``n``) under the job's key,
    I/O-like work (a sleep), its end recorded for the early-end check."""
    from otel_taskctx import register_descendants
    from tests.testapp.models import Child

    reserved = bool(register_descendants(Child, [n]))
    time.sleep(seconds)
    Path(marker_dir, f"child-{n}.json").write_text(
        json.dumps({"end": time.time(), "reserved": reserved})
    )


@app.task(name="bench.fan_job")
def fan_job(children: int, seconds: float, marker_dir: str) -> None:
    """The job: launches its children inside itself (inline or fanned out, as the policy says)."""
    for n in range(1, children + 1):
        fan_child.delay(n, seconds, marker_dir)


def _job_completed(sender=None, task_id=None, error=None, **kwargs) -> None:
    """otel_taskctx's job completion (after its last descendant), recorded for the bench."""
    marker_dir = os.environ.get("BENCH_CELERY_MARKERS")
    if marker_dir and sender == "bench.fan_job":
        Path(marker_dir, f"completed-{task_id}.json").write_text(
            json.dumps({"end": time.time(), "error": str(error or "")})
        )


try:  # the Celery front end's completion signal; absent in a checkout without it
    from otel_taskctx.signals import job_completed
except ImportError:
    job_completed = None
else:
    job_completed.connect(_job_completed, dispatch_uid="bench.celery.job_completed")
