"""Start a host configuration and launch nested work on each queue it has.

Run in a subprocess by ``tests/test_host_configs.py``::

    DJANGO_SETTINGS_MODULE=tests.configs.<name>_settings TASKCTX_CONFIG_DIR=<dir> \
        python -m tests.configs.probe [--own-provider]

Prints one line ``RESULT <json>``: the warnings ``django.setup()`` raised, whether the
instrumentation is applied, and per queue what the parent and its nested child saw (task key,
depth, process) and how many jobs reached the queue. ``--own-provider``: the host sets its own
tracer provider after ``django.setup()``, and the result says whether it stayed the global one
and which spans it received.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any


def _seen(marker_dir: Path, label: str) -> dict[str, Any] | None:
    path = marker_dir / f"{label}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _django_q(marker_dir: Path) -> dict[str, Any]:
    """A job run by django-q2 (``sync``) that launches a nested job with ``async_task``."""
    from django.apps import apps
    from django_q.models import OrmQ
    from django_q.tasks import async_task

    from tests.configs.tinyapp import tasks

    if apps.is_installed("powercrud"):
        from powercrud.async_manager import AsyncManager

        key = AsyncManager().launch_async_task(f"{tasks.HERE}.q_parent", str(marker_dir), sync=True)
    else:
        key = "host-config-job"
        async_task(f"{tasks.HERE}.q_parent_with_key", str(marker_dir), key, sync=True)
    return {
        "key": key,
        "parent": _seen(marker_dir, "q-parent"),
        "child": _seen(marker_dir, "q-child"),
        "queued": OrmQ.objects.count(),  # a nested job that escaped waits in the broker
    }


def _django_tasks(marker_dir: Path) -> dict[str, Any]:
    """A ``django.tasks`` task that enqueues a nested task; a db_worker runs it when the
    backend is django-tasks-db's."""
    from tests.configs.tinyapp import tasks

    backend = tasks.t_parent.get_backend()
    result = tasks.t_parent.enqueue(str(marker_dir))
    outcome: dict[str, Any] = {"backend": f"{type(backend).__module__}.{type(backend).__name__}"}
    if type(backend).__module__.startswith("django_tasks_db"):
        from django_tasks_db.models import DBTaskResult

        argv = [sys.executable, "-m", "django", "db_worker", "--batch", "--no-startup-delay"]
        worker = subprocess.run(
            [*argv, "--no-reload", "--interval", "0.1"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        outcome["worker_rc"] = worker.returncode
        outcome["worker_output"] = (worker.stdout + worker.stderr)[-2000:]
        outcome["queued"] = DBTaskResult.objects.count()  # 1: the child never reached the queue
        outcome["status"] = DBTaskResult.objects.get(id=result.id).status
    else:
        outcome["status"] = str(result.status)
    outcome["parent"] = _seen(marker_dir, "t-parent")
    outcome["child"] = _seen(marker_dir, "t-child")
    return outcome


def main() -> None:
    own_provider = "--own-provider" in sys.argv
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import django

        django.setup()
    result: dict[str, Any] = {
        "setup_warnings": [f"{w.category.__name__}: {w.message}" for w in caught],
    }
    exporter = None
    if own_provider:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        exporter = InMemorySpanExporter()
        mine = TracerProvider()
        mine.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(mine)
        result["provider_is_theirs"] = trace.get_tracer_provider() is mine

    from django.apps import apps
    from django.conf import settings
    from django.core.management import call_command
    from opentelemetry.instrumentation.taskctx import TaskContextInstrumentor

    patches = TaskContextInstrumentor()._patches
    result["instrumented"] = TaskContextInstrumentor().is_instrumented_by_opentelemetry
    result["applied"] = bool(patches is not None and patches.applied)
    call_command("migrate", verbosity=0)
    if "DatabaseCache" in settings.CACHES["default"]["BACKEND"]:
        call_command("createcachetable", verbosity=0)
    marker_root = Path(os.environ["TASKCTX_CONFIG_DIR"]) / "markers"
    for queue, launch in (("django_q", _django_q), ("django_tasks", _django_tasks)):
        if queue == "django_q" and not apps.is_installed("django_q"):
            continue
        marker_dir = marker_root / queue
        marker_dir.mkdir(parents=True, exist_ok=True)
        result[queue] = launch(marker_dir)
    if exporter is not None:
        from opentelemetry import trace

        trace.get_tracer_provider().force_flush()
        result["their_spans"] = [
            {"name": s.name, "task_key": (s.attributes or {}).get("taskctx.task_key")}
            for s in exporter.get_finished_spans()
        ]
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
