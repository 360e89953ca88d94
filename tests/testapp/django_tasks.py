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

from otel_taskctx import fan_out

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


def _sync(label: str, child_ids: list[int], marker_dir: str, fail: bool, **seen: Any) -> int:
    """Lock the children under the task's key, say what it saw, report progress."""
    from otel_taskctx import current_task, get_conflict_store, register_descendants, report_progress
    from otel_taskctx.descendants import resolve_manager

    reg = register_descendants(CHILD, child_ids)
    identity = current_task()
    held = {}
    if identity is not None:
        store = get_conflict_store(resolve_manager(identity))
        held = {str(k): v for k, v in store.holders({CHILD: child_ids}).get(CHILD, {}).items()}
    _write(marker_dir, label, {**_seen(), **seen, "registered": bool(reg), "held": held})
    report_progress(f"{label}: {len(child_ids)} children", done=1, total=1)
    if fail:
        raise ValueError(f"{label} failed on purpose")
    return len(child_ids)


@task
def sync_chapters(label: str, child_ids: list[int], marker_dir: str, fail: bool = False) -> int:
    """A nested step: locks the children under the task's key, reports progress."""
    return _sync(label, child_ids, marker_dir, fail)


@fan_out
@task
def sync_part(
    label: str,
    child_ids: list[int],
    marker_dir: str,
    job_result_id: str,
    fail: bool = False,
    pause: bool = False,
) -> int:
    """A nested step that fans out (its decorator): a child task of its own, which also
    records the status of its job's result while it runs. ``pause``: it stops at the marker
    ``<label>-pause`` first (see tests.testapp.reliability.pause)."""
    from django_tasks_db.models import DBTaskResult

    from otel_taskctx import register_descendants
    from tests.testapp.reliability import pause as stop_at

    if pause:  # its children locked first, as a worker killed mid-way leaves them
        register_descendants(CHILD, child_ids)
        stop_at(marker_dir, f"{label}-pause")
    job_status = DBTaskResult.objects.get(id=job_result_id).status
    return _sync(label, child_ids, marker_dir, fail, job_status=job_status)


@task(takes_context=True)
def publish_parts(
    context: Any,
    label: str,
    groups: list[list[int]],
    marker_dir: str,
    fail_part: int = -1,
    pause_part: int = -1,
    fail_self: bool = False,
) -> str:
    """A parent task that fans out one child task per group of children, then ends (or,
    ``fail_self``, raises)."""
    _write(marker_dir, f"{label}-parent", _seen())
    for n, ids in enumerate(groups):
        job_id = str(context.task_result.id)
        sync_part.enqueue(
            f"{label}-{n}", ids, marker_dir, job_id, fail=n == fail_part, pause=n == pause_part
        )
    if fail_self:
        raise RuntimeError(f"{label} failed after fanning out")
    return label


@task
def publish(label: str, child_ids: list[int], marker_dir: str, fail_child: bool = False) -> str:
    """A parent task whose step enqueues a nested task (run inline under its key)."""
    from otel_taskctx import report_progress

    _write(marker_dir, f"{label}-parent", _seen())
    report_progress(f"{label}: started")
    nested = sync_chapters.enqueue(f"{label}-child", child_ids, marker_dir, fail=fail_child)
    return f"{nested.id}:{nested.return_value}"


@task
def observe_any(label: str, marker_dir: str, **extra: Any) -> str:
    """Like :func:`observe`, and takes any other keyword argument (a carrier made by hand)."""
    _write(marker_dir, label, {**_seen(), "extra": sorted(extra)})
    return label


@task
def hold_children(
    label: str, child_ids: list[int], marker_dir: str, seconds: float = 0.0, pause: bool = False
) -> int:
    """Lock the children under the task's key, work ``seconds`` (``pause``: stop at the
    marker ``<label>-pause`` first), then say who holds them."""
    import time

    from otel_taskctx import get_conflict_store, register_descendants
    from otel_taskctx.task_manager import TaskManager
    from tests.testapp.reliability import pause as stop_at

    registered = register_descendants(CHILD, child_ids)
    if pause:
        stop_at(marker_dir, f"{label}-pause")
    time.sleep(seconds)  # the task's own work, while its locks must stay
    holders = get_conflict_store(TaskManager()).holders({CHILD: child_ids}).get(CHILD, {})
    held = {str(k): v for k, v in holders.items()}
    _write(marker_dir, label, {**_seen(), "registered": bool(registered), "held": held})
    return len(child_ids)


@fan_out
@task
def observe_child(label: str, marker_dir: str, **extra: Any) -> str:
    """:func:`observe_any`, marked to fan out (a worker looks for its carrier)."""
    return observe_any.call(label, marker_dir, **extra)


@fan_out
@task
def hold_child(
    label: str, child_ids: list[int], marker_dir: str, seconds: float = 0.0, pause: bool = False
) -> int:
    """:func:`hold_children`, marked to fan out (a worker looks for its carrier)."""
    return hold_children.call(label, child_ids, marker_dir, seconds, pause)


@task
def noop(n: int) -> int:
    """The benchmark's task (tests/benchmarks/bench_django_tasks.py)."""
    return n
