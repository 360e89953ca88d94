"""Patching is all or nothing: a patch that fails undoes the ones applied before it.

Run in a subprocess (a project of ``tests/configs`` with the app's own instrumentation off),
so that undoing patches cannot touch the instrumented test process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.cluster import REPO_ROOT

SCRIPT = """
import json
import django
from django.conf import settings
settings.OTEL_TASKCTX = {"AUTO_INSTRUMENT": False, "SPAN_STORE": False}
django.setup()
import wrapt
from django_q import signals, tasks
from powercrud.async_manager import AsyncManager
from opentelemetry.instrumentation.taskctx import TaskContextInstrumentor, patching, tracing

def ours():
    return sorted(
        str(key[0]) for signal in (signals.pre_enqueue, signals.pre_execute)
        for key, *_ in signal.receivers if "otel_taskctx.instrumentation" in str(key[0])
    )

def wrapped():
    return {
        "async_task": isinstance(tasks.async_task, wrapt.FunctionWrapper),
        "launch": isinstance(vars(AsyncManager)["launch_async_task"], wrapt.FunctionWrapper),
    }

def boom(*args):
    raise RuntimeError("patching failed on purpose")

real = patching.Patches._apply_django_tasks
patching.Patches._apply_django_tasks = boom  # the last patch fails
error = None
try:
    TaskContextInstrumentor().instrument()
except RuntimeError as exc:
    error = str(exc)
after_failure = {
    "error": error, "wrapped": wrapped(), "receivers": ours(), "active": tracing.STATE.active
}
TaskContextInstrumentor().uninstrument()
patching.Patches._apply_django_tasks = real
TaskContextInstrumentor().instrument()
print("RESULT " + json.dumps({
    "after_failure": after_failure,
    "after_retry": {"wrapped": wrapped(), "receivers": ours()},
}))
"""


def test_a_failing_patch_leaves_nothing_half_applied(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "TASKCTX_"))}
    env.update(
        DJANGO_SETTINGS_MODULE="tests.configs.q_powercrud_settings",
        TASKCTX_CONFIG_DIR=str(tmp_path),
        PYTHONPATH=str(REPO_ROOT),
    )
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
    assert result["after_failure"] == {
        "error": "patching failed on purpose",
        "wrapped": {"async_task": False, "launch": False},
        "receivers": [],
        "active": False,
    }
    assert result["after_retry"]["wrapped"] == {"async_task": True, "launch": True}
    assert result["after_retry"]["receivers"] == [
        "otel_taskctx.instrumentation.pre_enqueue",
        "otel_taskctx.instrumentation.pre_execute",
    ]


def test_a_stale_wrapper_of_ours_is_replaced_not_wrapped_again():
    """An instrumentor that was never uninstrumented left its wrapper: the next one takes its
    place instead of wrapping it (no double span, no double decision per call)."""
    from opentelemetry.instrumentation.taskctx import patching

    class Target:
        def f(self):
            return 1

    def plus_one(wrapped, instance, args, kwargs):
        return wrapped(*args, **kwargs) + 1

    stale, fresh = patching.Patches(), patching.Patches()
    stale.wrap(Target, "f", plus_one)  # never removed
    fresh.wrap(Target, "f", plus_one)
    assert Target().f() == 2  # wrapped once, not twice
    fresh.remove()
    assert Target().f() == 1
    stale.remove()  # its wrapper is gone already: nothing to undo
    assert Target().f() == 1
