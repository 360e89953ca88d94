"""``opentelemetry-instrument`` finds the instrumentor through its entry point.

The script turns the app's own instrumentation off (``AUTO_INSTRUMENT: False``), so what it
reports comes from the entry point alone; a control run without ``opentelemetry-instrument``
shows nothing patched. ``opentelemetry-instrument`` loads instrumentors before Django is set
up: patching waits for ``django.setup()``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.cluster import REPO_ROOT

SCRIPT = """
import json, os
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
from opentelemetry.instrumentation.taskctx import TaskContextInstrumentor
loaded_before_setup = TaskContextInstrumentor().is_instrumented_by_opentelemetry
import django
from django.conf import settings
settings.OTEL_TASKCTX = {"AUTO_INSTRUMENT": False, "SPAN_STORE": False}
django.setup()
from django_q import signals, tasks
from powercrud import async_manager
from powercrud.async_manager import AsyncManager
from otel_taskctx import task_context
nested = None
import wrapt
if isinstance(tasks.async_task, wrapt.FunctionWrapper):  # else it would really enqueue
    with task_context("job-ep"):
        nested = tasks.async_task("tests.testapp.tasks.noop", 1)
print("RESULT " + json.dumps({
    "loaded_before_setup": loaded_before_setup,
    "instrumented": TaskContextInstrumentor().is_instrumented_by_opentelemetry,
    "async_task_wrapped": isinstance(tasks.async_task, wrapt.FunctionWrapper),
    "powercrud_rebound": async_manager.async_task is tasks.async_task,
    "launch_wrapped": isinstance(vars(AsyncManager)["launch_async_task"], wrapt.FunctionWrapper),
    "receivers": sorted(
        str(key[0]) for signal in (signals.pre_enqueue, signals.pre_execute)
        for key, *_ in signal.receivers if "otel_taskctx.instrumentation" in str(key[0])
    ),
    "nested": nested,
}))
"""


def _run(tmp_path: Path, *prefix: str) -> dict:
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    env = dict(os.environ)
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "PYTHONPATH": str(REPO_ROOT),
            "OTEL_TRACES_EXPORTER": "none",
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_LOGS_EXPORTER": "none",
        }
    )
    proc = subprocess.run(
        [*prefix, sys.executable, str(script)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_opentelemetry_instrument_activates_the_instrumentor(tmp_path):
    bin_dir = Path(sys.executable).parent
    result = _run(tmp_path, str(bin_dir / "opentelemetry-instrument"))
    assert result == {
        "loaded_before_setup": True,
        "instrumented": True,
        "async_task_wrapped": True,
        "powercrud_rebound": True,
        "launch_wrapped": True,
        "receivers": [
            "otel_taskctx.instrumentation.pre_enqueue",
            "otel_taskctx.instrumentation.pre_execute",
        ],
        "nested": "job-ep/nested/1-noop",
    }


def test_without_the_entry_point_nothing_is_patched(tmp_path):
    result = _run(tmp_path)
    assert result["instrumented"] is False
    assert result["async_task_wrapped"] is False
    assert result["launch_wrapped"] is False
    assert result["receivers"] == []
