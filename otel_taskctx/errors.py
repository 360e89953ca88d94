"""Exceptions raised by otel_taskctx."""

from __future__ import annotations

from collections.abc import Hashable, Mapping


class TaskContextError(Exception):
    """Base class for otel_taskctx errors."""


class DescendantConflict(TaskContextError):
    """Some descendants are held by another task; nothing new was reserved. ``conflicts``:
    ``{app_label.modelname: {id: holder task key}}``; ``model``, ``ids``, ``holder_task_key``:
    the first model's."""

    def __init__(self, task_key: str, conflicts: Mapping[str, Mapping[Hashable, str]]) -> None:
        self.task_key = task_key
        self.conflicts = {model: dict(held) for model, held in conflicts.items()}
        self.model = next(iter(self.conflicts))
        self.ids = sorted(self.conflicts[self.model], key=str)
        self.holder_task_key = self.conflicts[self.model][self.ids[0]]
        parts = []
        for model, held in self.conflicts.items():
            by_holder: dict[str, list[Hashable]] = {}
            for obj_id, holder in held.items():
                by_holder.setdefault(holder, []).append(obj_id)
            for holder, ids in by_holder.items():
                ids.sort(key=str)
                more = f" and {len(ids) - 20} more" if len(ids) > 20 else ""
                shown = ", ".join(map(str, ids[:20]))
                parts.append(f"{model} ids [{shown}{more}] are held by task {holder}")
        super().__init__(f"task {task_key} cannot reserve descendants: " + "; ".join(parts))


class ConflictStoreUnavailable(TaskContextError):
    """The conflict store could not be reached; nothing may proceed unlocked."""


class FanOutUnavailable(TaskContextError):
    """A nested launch cannot fan out here without losing the barrier (e.g. a sync broker)."""


class FanOutChildFailed(TaskContextError):
    """A fanned-out child of a job failed (the job's result names this class)."""


class FanOutChildLost(TaskContextError):
    """A fanned-out ``django.tasks`` child that never ended: the sweep fails it with this."""


class CanvasInsideJob(TaskContextError):
    """A Celery canvas (group, chain, chord, link, link_error) launched inside a job."""


class NestedTaskNotRegistered(TaskContextError, LookupError):
    """``send_task`` inside a job, to run inline, of a task this process does not have."""
