"""Celery is patched only once it is imported, never imported by otel_taskctx itself, and
the patches are undone by ``uninstrument()``. Run in a subprocess (a fresh interpreter where
Celery was never imported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.cluster import REPO_ROOT

SCRIPT = """
import json, sys
import django
from django.conf import settings
settings.OTEL_TASKCTX = {"AUTO_INSTRUMENT": False, "SPAN_STORE": False}
django.setup()
import wrapt
from opentelemetry.instrumentation.taskctx import TaskContextInstrumentor

def state():
    from celery import signals
    from celery.app.base import Celery
    from celery.app.task import Task
    names = sorted(
        str(key[0]) for signal in (signals.before_task_publish, signals.task_prerun,
                                   signals.task_postrun, signals.task_failure, signals.task_revoked,
                                   signals.worker_ready)
        for key, *_ in signal.receivers if "otel_taskctx.instrumentation" in str(key[0])
    )
    return {
        "apply_async": isinstance(vars(Task)["apply_async"], wrapt.FunctionWrapper),
        "send_task": isinstance(vars(Celery)["send_task"], wrapt.FunctionWrapper),
        "receivers": names,
    }

TaskContextInstrumentor().instrument()
imported_by_us = "celery" in sys.modules
import celery  # the project imports it: the post-import hook patches it now
patched = state()
TaskContextInstrumentor().uninstrument()
removed = state()
TaskContextInstrumentor().instrument()  # Celery already imported: patched at once
again = state()
print("RESULT " + json.dumps({"imported_by_us": imported_by_us, "patched": patched,
                              "removed": removed, "again": again}))
"""


def test_celery_is_patched_when_imported_and_unpatched_on_uninstrument():
    env = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_")}
    env.update(DJANGO_SETTINGS_MODULE="tests.settings", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    receivers = [
        f"otel_taskctx.instrumentation.celery_{name}"
        for name in ("failure", "postrun", "prerun", "publish", "ready", "revoked")
    ]
    assert result["imported_by_us"] is False
    assert result["patched"] == {"apply_async": True, "send_task": True, "receivers": receivers}
    assert result["removed"] == {"apply_async": False, "send_task": False, "receivers": []}
    assert result["again"] == result["patched"]
