"""Exceptions raised by otel_taskctx."""

from __future__ import annotations

from collections.abc import Hashable, Mapping


class TaskContextError(Exception):
    """Base class for otel_taskctx errors."""


class DescendantConflict(TaskContextError):
    """Some descendant objects are held by another task; nothing new was reserved.

    ``conflicts`` maps ``app_label.modelname`` to ``{object id: holder task key}``.
    """

    def __init__(self, task_key: str, conflicts: Mapping[str, Mapping[Hashable, str]]) -> None:
        self.task_key = task_key
        self.conflicts = {model: dict(held) for model, held in conflicts.items()}
        first_model = next(iter(self.conflicts))
        self.model = first_model
        self.ids = sorted(self.conflicts[first_model], key=str)
        self.holder_task_key = self.conflicts[first_model][self.ids[0]]
        super().__init__(self._message())

    def _message(self) -> str:
        parts = []
        for model, held in self.conflicts.items():
            by_holder: dict[str, list[Hashable]] = {}
            for obj_id, holder in held.items():
                by_holder.setdefault(holder, []).append(obj_id)
            for holder, ids in by_holder.items():
                shown = ", ".join(str(i) for i in sorted(ids, key=str)[:20])
                more = f" and {len(ids) - 20} more" if len(ids) > 20 else ""
                parts.append(f"{model} ids [{shown}{more}] are held by task {holder}")
        return f"task {self.task_key} cannot reserve descendants: " + "; ".join(parts)


class ConflictStoreUnavailable(TaskContextError):
    """The conflict store could not be reached; nothing may proceed unlocked."""


class FanOutUnavailable(TaskContextError):
    """A nested launch cannot fan out here without losing the barrier (e.g. a sync broker)."""


class FanOutChildFailed(TaskContextError):
    """A fanned-out child of a job failed; the job's result names it (``django.tasks`` results
    carry this class path; django-q2 Task rows say it in their result)."""


class FanOutChildLost(TaskContextError):
    """A fanned-out ``django.tasks`` child that never ended (its ``db_worker`` was killed or
    lost): the timeout sweep fails its own result with this class path."""
