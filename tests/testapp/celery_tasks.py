"""Celery tasks for tests/test_celery*.py (run by a real ``celery worker``).

Each writes what it saw to ``<marker_dir>/<label>.json``: the task identity, the locks held
under its key, its process and worker.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from otel_taskctx import fan_out
from tests.celery_app import app

CHILD = "testapp.child"


def seen() -> dict[str, Any]:
    from otel_taskctx import current_task, skip_nested_async

    identity = current_task()
    return {
        "task_key": identity.task_key if identity else None,
        "root": identity.root_task_key if identity else None,
        "depth": identity.depth if identity else None,
        "manager": identity.manager_class_path if identity else None,
        "skip_nested": skip_nested_async(),
        "pid": os.getpid(),
    }


def write(marker_dir: str, label: str, data: dict[str, Any]) -> None:
    path = Path(marker_dir) / f"{label}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def holders(ids: list[int]) -> dict[str, str]:
    from otel_taskctx import get_conflict_store
    from otel_taskctx.task_manager import TaskManager

    held = get_conflict_store(TaskManager()).holders({CHILD: ids}).get(CHILD, {})
    return {str(k): v for k, v in held.items()}


@app.task
def observe(label: str, marker_dir: str) -> str:
    write(marker_dir, label, seen())
    return label


@app.task
def hold(
    label: str,
    ids: list[int],
    marker_dir: str,
    fail: bool = False,
    pause: bool = False,
    seconds: float = 0.0,
) -> int:
    """Lock ``ids`` under the task's key, report progress, say what it saw (``pause``: stop
    at the marker ``<label>-pause`` first; ``seconds``: work that long; ``fail``: raise at
    the end)."""
    import time

    from otel_taskctx import register_descendants, report_progress
    from tests.testapp.reliability import pause as stop_at

    registered = register_descendants(CHILD, ids)
    report_progress(f"{label}: {len(ids)} children", done=1, total=2)
    if pause:
        stop_at(marker_dir, f"{label}-pause")
    time.sleep(seconds)  # the task's own work, while its locks must stay
    write(marker_dir, label, {**seen(), "registered": bool(registered), "held": holders(ids)})
    if fail:
        raise ValueError(f"{label} failed on purpose")
    return len(ids)


@app.task
def parent(label: str, ids: list[int], marker_dir: str, how: str = "delay", **extra: Any) -> Any:
    """A job that launches :func:`hold` inside itself (``how``: delay, send_task, nested
    (allow_nested_async), unknown (send_task of an unregistered name), group, link)."""
    from celery import group

    from otel_taskctx import allow_nested_async

    write(marker_dir, f"{label}-parent", seen())
    child = f"{label}-child"
    if how == "delay":
        result = hold.delay(child, ids, marker_dir, **extra)
    elif how == "send_task":
        result = app.send_task(hold.name, (child, ids, marker_dir), extra)
    elif how == "enqueue":
        with allow_nested_async():
            result = hold.delay(child, ids, marker_dir)
        return result.id
    elif how == "unknown":
        result = app.send_task("tests.nowhere.task", (child,))
    elif how == "group":
        result = group(hold.s(child, ids, marker_dir)).apply_async()
    elif how == "link":
        result = hold.apply_async((child, ids, marker_dir), link=observe.si(child, marker_dir))
    else:
        raise ValueError(how)
    after = {**seen(), "held": holders(ids), "child_value": result.get(disable_sync_subtasks=False)}
    write(marker_dir, f"{label}-after", after)
    return after["child_value"]


@app.task
def progress_of(key: str) -> Any:
    from otel_taskctx.task_manager import get_progress

    return get_progress(key)


@app.task
@fan_out
def part(
    label: str, ids: list[int], marker_dir: str, fail: bool = False, pause: bool = False
) -> int:
    """A fanned-out child (its decorator): :func:`hold` in a task of its own."""
    return hold.run(label, ids, marker_dir, fail, pause)


@app.task
def fan(
    label: str,
    groups: list[list[int]],
    marker_dir: str,
    fail_part: int = -1,
    pause_part: int = -1,
    fail_self: bool = False,
) -> str:
    """A job that fans out one :func:`part` per group, then ends (``fail_self``: raises)."""
    write(marker_dir, f"{label}-parent", seen())
    for n, ids in enumerate(groups):
        part.delay(f"{label}-{n}", ids, marker_dir, fail=n == fail_part, pause=n == pause_part)
    if fail_self:
        raise RuntimeError(f"{label} failed after fanning out")
    return label


def _record_completion(
    sender: Any = None, task_key: str = "", task_id: str = "", error: str = "", **kw: Any
) -> None:
    """``job_completed``: a marker ``completed-<task id>.json`` in ``TASKCTX_CELERY_MARKERS``."""
    directory = os.environ.get("TASKCTX_CELERY_MARKERS")
    if directory:
        data = {"sender": sender, "task_key": task_key, "error": error, "pid": os.getpid()}
        write(directory, f"completed-{task_id}", data)


def _connect() -> None:
    from otel_taskctx.signals import job_completed

    job_completed.connect(_record_completion, dispatch_uid="tests.celery_tasks.completion")


_connect()
