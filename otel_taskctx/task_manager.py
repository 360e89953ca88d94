"""Locks and progress of ``django.tasks`` tasks without powercrud: :class:`TaskManager` stands
where powercrud's ``AsyncManager`` stands for django-q2 jobs (the cache
``OTEL_TASKCTX["TASKS_CACHE"]`` made lock-safe, powercrud's key prefixes, the lock TTL).
"""

from __future__ import annotations

from typing import Any

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
    conflict_ttl = 3600  # OTEL_TASKCTX["LOCK_TTL"] overrides it
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
