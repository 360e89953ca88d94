"""powercrud's async dashboard for the sample: lifecycle events go to ``AsyncTaskRecord``.

It also remembers, per job and in the worker's process, how far powercrud's own loop is
(``starting update``, ``updating: i/n``), so that ``Book.save()`` can report the **job's**
fraction (books done plus chapters within the current book): see :func:`job_position`.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any

from powercrud.async_dashboard import ModelTrackingAsyncManager

LOOP_STEP = re.compile(r"^(?:updating|deleting): (\d+)/(\d+)$")
LOOP_START = ("starting update", "starting delete")
LOOP_END = ("completed ", "failed ")
_positions: dict[str, tuple[int, int]] = {}
_lock = threading.Lock()


def job_position(task_key: str) -> tuple[int, int] | None:
    """``(objects done, objects in the job)`` of powercrud's bulk job ``task_key``, as its
    own progress said last in this process; None when it is not one (or not known)."""
    with _lock:
        return _positions.get(task_key)


def _job_size(task_key: str) -> int | None:
    """How many objects the job was queued for (its ``selected_ids``, from the dashboard)."""
    from django.apps import apps

    records = apps.get_model(SampleAsyncManager.record_model_path)
    deadline = time.monotonic() + 2  # powercrud writes the row just after queueing the job
    while (record := records.objects.filter(task_name=task_key).first()) is None:
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)
    args = record.task_args
    if isinstance(args, list) and len(args) > 1 and isinstance(args[1], list):
        return len(args[1]) or None
    return None


class SampleAsyncManager(ModelTrackingAsyncManager):
    record_model_path = "library.AsyncTaskRecord"

    @classmethod
    def class_path(cls) -> str:
        return f"{cls.__module__}.{cls.__qualname__}"

    def format_user(self, user: Any) -> str:
        if not user or getattr(user, "is_anonymous", False):
            return "anonymous"
        return user.get_username() if hasattr(user, "get_username") else str(user)

    def update_progress(self, task_name, progress_data):
        text = str(progress_data)
        step = LOOP_STEP.match(text)
        if text in LOOP_START:
            size = _job_size(task_name)
            with _lock:
                if size:
                    _positions[task_name] = (0, size)
        elif step:
            with _lock:
                _positions[task_name] = (int(step[1]), int(step[2]))
        elif text.startswith(LOOP_END):
            with _lock:
                _positions.pop(task_name, None)
        return super().update_progress(task_name, progress_data)
