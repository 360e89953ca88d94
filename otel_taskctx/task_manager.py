"""Locks and progress of ``django.tasks`` tasks, without powercrud.

A task enqueued through Django's task framework names :class:`TaskManager` in its identity.
It stands where powercrud's ``AsyncManager`` stands for django-q2 jobs: it gives the conflict
store a cache (``OTEL_TASKCTX["TASKS_CACHE"]``, made lock-safe like powercrud's, see
:mod:`otel_taskctx.cache`), the lock key prefixes and the lock TTL, and it stores progress.
The keys are powercrud's, so a project that uses both sees one set of locks.

:func:`get_progress` reads a task's progress by its task key.
"""

from __future__ import annotations

from typing import Any

#: the dotted path a django.tasks identity names as its manager
TASK_MANAGER_PATH = f"{__name__}.TaskManager"


def tasks_cache_alias() -> str:
    from otel_taskctx.conf import get_setting

    alias = get_setting("TASKS_CACHE")
    if alias:
        return str(alias)
    try:
        from powercrud.conf import get_powercrud_setting

        return str(get_powercrud_setting("CACHE_NAME", "default") or "default")
    except Exception:  # powercrud not configured
        return "default"


class TaskManager:
    """The cache, key prefixes and TTLs of ``django.tasks`` tasks' locks and progress."""

    conflict_prefix = "powercrud:async:conflict:"
    conflict_model_prefix = "powercrud:conflict:model:"
    progress_prefix = "powercrud:async:progress:"
    #: seconds a lock lives without refresh (``OTEL_TASKCTX["LOCK_TTL"]`` overrides it)
    conflict_ttl = 3600
    #: seconds a progress message stays readable after it was written
    progress_ttl = 24 * 3600

    def __init__(self, cache_name: str | None = None) -> None:
        from django.core.cache import caches

        from otel_taskctx.cache import lock_safe

        self.cache_name = cache_name or tasks_cache_alias()
        self.cache = lock_safe(caches[self.cache_name], self.cache_name)

    def update_progress(self, task_key: str, message: str) -> None:
        self.cache.set(f"{self.progress_prefix}{task_key}", str(message), self.progress_ttl)

    def get_progress(self, task_key: str) -> str | None:
        return self.cache.get(f"{self.progress_prefix}{task_key}")

    def __repr__(self) -> str:
        return f"<TaskManager cache={self.cache_name!r}>"


def get_progress(task_key: str) -> Any:
    """The last progress message of a ``django.tasks`` task (None when there is none)."""
    return TaskManager().get_progress(task_key)
