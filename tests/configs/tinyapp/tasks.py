"""Task functions of the tiny app. Each writes what it saw to ``<marker_dir>/<label>.json``:
the task key and depth of the identity it runs under, and its process id."""

from __future__ import annotations

import json
import os
from pathlib import Path

from django.tasks import task

HERE = __name__


def record(marker_dir: str, label: str) -> None:
    from otel_taskctx import current_task

    identity = current_task()
    seen = {
        "task_key": identity.task_key if identity else None,
        "depth": identity.depth if identity else None,
        "pid": os.getpid(),
    }
    (Path(marker_dir) / f"{label}.json").write_text(json.dumps(seen))


# --- django-q2 (and powercrud) jobs ---------------------------------------------------------
def q_child(marker_dir: str, **kwargs) -> str:
    record(marker_dir, "q-child")
    return "child"


def q_parent(marker_dir: str, **kwargs) -> str:
    """A job that launches a nested job with django-q2's public ``async_task``."""
    from django_q.tasks import async_task

    record(marker_dir, "q-parent")
    async_task(f"{HERE}.q_child", marker_dir)
    return "parent"


def q_parent_with_key(marker_dir: str, key: str, **kwargs) -> str:
    """A plain django-q2 job (no powercrud) that names its own task with ``task_context``."""
    from otel_taskctx import task_context

    with task_context(key):
        return q_parent(marker_dir)


# --- django.tasks ---------------------------------------------------------------------------
@task
def t_child(marker_dir: str) -> str:
    record(marker_dir, "t-child")
    return "child"


@task
def t_parent(marker_dir: str) -> str:
    """A task that enqueues a nested task with the public ``Task.enqueue``."""
    record(marker_dir, "t-parent")
    return str(t_child.enqueue(marker_dir).status)
