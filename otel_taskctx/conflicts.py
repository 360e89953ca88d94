"""The conflict store for descendant objects: powercrud's lock keys, reserved all-or-nothing.

Locks use powercrud's own format, so its ``check_conflict`` sees them and its completion hook
(``remove_conflict_ids``) releases them with the task's other locks:

* lock key ``powercrud:conflict:model:<app_label.modelname>:<id>`` -> holder task key
* tracking set ``powercrud:async:conflict:<task key>`` -> set of lock keys

Unlike powercrud's ``add_conflict_ids``, a reservation is re-entrant (ids the task already
holds are fine and never rolled back) and a conflict names the holder task.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from otel_taskctx.errors import ConflictStoreUnavailable, DescendantConflict

log = logging.getLogger("otel_taskctx.conflicts")


def normalise_ids(ids: Iterable[Hashable]) -> list[Hashable]:
    """Keep integer, string and UUID keys as given (deduplicated by their key text)."""
    if isinstance(ids, (str, bytes)):
        raise TypeError("ids must be an iterable of primary keys, not a single string")
    seen: dict[str, Hashable] = {}
    for pk in ids:
        if pk is None:
            continue
        if isinstance(pk, bool) or not isinstance(pk, Hashable):
            raise TypeError(f"unsupported primary key {pk!r}")
        seen.setdefault(str(pk), pk)
    return list(seen.values())


@dataclass
class Reservation:
    """What a reservation did: ``reserved`` were new locks, ``already_held`` were ours."""

    task_key: str
    reserved: dict[str, list[Hashable]] = field(default_factory=dict)
    already_held: dict[str, list[Hashable]] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.reserved.values()) + sum(
            len(v) for v in self.already_held.values()
        )


class CacheConflictStore:
    """Reserve locks through the manager's cache with per-key ``add`` (any Django cache)."""

    def __init__(self, manager: Any) -> None:
        self.manager = manager
        self.cache = manager.cache
        self.ttl = manager.conflict_ttl

    def lock_key(self, model: str, obj_id: Hashable) -> str:
        return f"{self.manager.conflict_model_prefix}{model}:{obj_id}"

    def tracking_key(self, task_key: str) -> str:
        return f"{self.manager.conflict_prefix}{task_key}"

    def reserve(self, task_key: str, conflict_ids: Mapping[str, Iterable[Hashable]]) -> Reservation:
        result = Reservation(task_key)
        acquired: list[str] = []
        conflicts: dict[str, dict[Hashable, str]] = {}
        try:
            for model, ids in conflict_ids.items():
                for obj_id in ids:
                    key = self.lock_key(model, obj_id)
                    if self.cache.add(key, task_key, self.ttl):
                        acquired.append(key)
                        result.reserved.setdefault(model, []).append(obj_id)
                        continue
                    holder = self.cache.get(key)
                    if holder == task_key:
                        result.already_held.setdefault(model, []).append(obj_id)
                    elif holder is None and self.cache.add(key, task_key, self.ttl):
                        acquired.append(key)  # the holder's lock expired in between
                        result.reserved.setdefault(model, []).append(obj_id)
                    else:
                        conflicts.setdefault(model, {})[obj_id] = str(holder)
            if conflicts:
                self._rollback(task_key, acquired)
                raise DescendantConflict(task_key, conflicts)
            if acquired:
                tracking = self.tracking_key(task_key)
                existing = self.cache.get(tracking) or set()
                self.cache.set(tracking, set(existing) | set(acquired), self.ttl)
        except DescendantConflict:
            raise
        except Exception as exc:
            self._rollback(task_key, acquired)
            raise ConflictStoreUnavailable(
                f"could not reserve descendants for task {task_key}: {exc}"
            ) from exc
        return result

    def _rollback(self, task_key: str, keys: list[str]) -> None:
        for key in keys:
            try:
                if self.cache.get(key) == task_key:
                    self.cache.delete(key)
            except Exception:  # the lock will expire with its TTL
                log.warning("could not roll back lock %s of task %s", key, task_key)

    def holders(self, conflict_ids: Mapping[str, Iterable[Hashable]]) -> dict[str, dict[Hashable, str]]:
        """``{model: {id: holder}}`` for the ids that are locked."""
        out: dict[str, dict[Hashable, str]] = {}
        for model, ids in conflict_ids.items():
            ids = list(ids)
            values = self.cache.get_many([self.lock_key(model, i) for i in ids])
            for obj_id in ids:
                holder = values.get(self.lock_key(model, obj_id))
                if holder is not None:
                    out.setdefault(model, {})[obj_id] = holder
        return out


def get_conflict_store(manager: Any) -> CacheConflictStore:
    """The store to use for ``manager``'s cache."""
    return CacheConflictStore(manager)
