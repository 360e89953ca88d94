"""``django.tasks`` task functions for tests/test_django_tasks.py (run by a real db_worker).

Each writes what it saw to ``<marker_dir>/<label>.json``: the task identity, powercrud-free
locks it holds under the task's key, and its process.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from django.tasks import task

CHILD = "testapp.child"


def _seen() -> dict[str, Any]:
    from otel_taskctx import current_task

    identity = current_task()
    return {
        "task_key": identity.task_key if identity else None,
        "root": identity.root_task_key if identity else None,
        "depth": identity.depth if identity else None,
        "manager": identity.manager_class_path if identity else None,
        "pid": os.getpid(),
    }


def _write(marker_dir: str, label: str, data: dict[str, Any]) -> None:
    path = Path(marker_dir) / f"{label}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


@task
def observe(label: str, marker_dir: str) -> str:
    _write(marker_dir, label, _seen())
    return label


@task
def sync_chapters(label: str, child_ids: list[int], marker_dir: str, fail: bool = False) -> int:
    """A nested step: locks the children under the task's key, reports progress."""
    from otel_taskctx import get_conflict_store, register_descendants, report_progress
    from otel_taskctx.descendants import resolve_manager

    reg = register_descendants(CHILD, child_ids)
    from otel_taskctx import current_task

    identity = current_task()
    held = {}
    if identity is not None:
        store = get_conflict_store(resolve_manager(identity))
        held = {str(k): v for k, v in store.holders({CHILD: child_ids}).get(CHILD, {}).items()}
    _write(marker_dir, label, {**_seen(), "registered": bool(reg), "held": held})
    report_progress(f"{label}: {len(child_ids)} children", done=1, total=1)
    if fail:
        raise ValueError(f"{label} failed on purpose")
    return len(child_ids)


@task
def publish(label: str, child_ids: list[int], marker_dir: str, fail_child: bool = False) -> str:
    """A parent task whose step enqueues a nested task (run inline under its key)."""
    from otel_taskctx import report_progress

    _write(marker_dir, f"{label}-parent", _seen())
    report_progress(f"{label}: started")
    nested = sync_chapters.enqueue(f"{label}-child", child_ids, marker_dir, fail=fail_child)
    return f"{nested.id}:{nested.return_value}"


@task
def noop(n: int) -> int:
    """The benchmark's task (tests/benchmarks/bench_django_tasks.py)."""
    return n
