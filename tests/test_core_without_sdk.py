"""The core and the instrumentor need the OpenTelemetry API only: with ``opentelemetry.sdk``
unimportable (a meta-path blocker, in a fresh process) the identity, context, propagation,
locks, progress and the Django app work; only the span processor and span store need the SDK.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    """
    import sys

    class NoSDK:
        def find_spec(self, name, path=None, target=None):
            if name == "opentelemetry.sdk" or name.startswith("opentelemetry.sdk."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, NoSDK())

    import otel_taskctx  # the core, API only
    from otel_taskctx import (
        current_task, extract, inject, register_descendants, report_progress, task_context,
    )
    from otel_taskctx import conflicts, context, descendants, identity, progress, propagation
    from otel_taskctx import semconv, tracer_provider
    from opentelemetry.instrumentation.taskctx import TaskContextInstrumentor

    import django
    from django.core.management import call_command

    django.setup()  # the app's ready(): instrumentation on, no span processor or store
    call_command("migrate", verbosity=0)
    from powercrud.async_manager import AsyncManager

    assert TaskContextInstrumentor().is_instrumented_by_opentelemetry
    manager = "powercrud.async_manager.AsyncManager"
    with task_context("job-1", manager):
        carrier = {}
        inject(carrier)
        assert register_descendants("testapp.Child", [1, 2])  # locked under the task key
        assert report_progress("half way")
    from opentelemetry import context as otel_context

    token = otel_context.attach(extract(carrier))  # the signed identity crosses the carrier
    assert current_task().task_key == "job-1"
    otel_context.detach(token)
    assert current_task() is None
    powercrud = AsyncManager()
    assert powercrud.check_conflict({"testapp.child": [1, 2, 3]}) == {1, 2}
    assert powercrud.get_progress("job-1") == "half way"
    assert not [m for m in sys.modules if m.startswith("opentelemetry.sdk")]
    try:
        otel_taskctx.TaskContextSpanProcessor
    except ImportError:
        print("ok: the span processor needs the SDK")
    """
)


def test_the_core_and_the_instrumentor_work_without_the_sdk(tmp_path):
    env = dict(
        os.environ,
        DJANGO_SETTINGS_MODULE="tests.settings",
        TASKCTX_STACK="embedded",
        TASKCTX_DB_NAME=str(tmp_path / "nosdk.sqlite3"),
        TASKCTX_TEST_OTEL_TASKCTX="{}",
        PYTHONPATH=str(ROOT),
    )
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok: the span processor needs the SDK" in out.stdout, out.stdout + out.stderr
