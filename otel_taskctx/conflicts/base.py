"""The conflict store's API, and its generic backend: locks through any Django cache, key by key,
in powercrud's own format (docs/conflicts.md, *Lock format*)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import batched
from typing import Any, NamedTuple

from otel_taskctx.errors import ConflictStoreUnavailable, DescendantConflict

log = logging.getLogger("otel_taskctx.conflicts")

#: ``{model label: ids}``; ``{model label: {id: holder task key}}``
Ids = Mapping[str, Iterable[Hashable]]
Holders = dict[str, dict[Hashable, str]]
#: task keys this process reserved locks for (a task that reserved none has nothing to release)
reserved_here: set[str] = set()


def normalise_ids(ids: Iterable[Hashable]) -> list[Hashable]:
    """Integer, string and UUID keys as given, deduplicated by their text (``1`` is ``"1"``)."""
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


def lock_ttl(manager: Any) -> int | None:
    """Seconds a lock lives without refresh: ``OTEL_TASKCTX["LOCK_TTL"]`` or powercrud's."""
    from otel_taskctx.conf import get_setting

    value = get_setting("LOCK_TTL")
    value = getattr(manager, "conflict_ttl", 3600) if value is None else value
    return None if value is None else int(value)


@dataclass
class Reservation:
    """What a reservation did: ``reserved`` were new locks, ``already_held`` were ours."""

    task_key: str
    reserved: dict[str, list[Hashable]] = field(default_factory=dict)
    already_held: dict[str, list[Hashable]] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(map(len, self.reserved.values())) + sum(map(len, self.already_held.values()))


class Item(NamedTuple):
    """One requested lock: model label, id as given, id text, powercrud's lock key."""

    model: str
    obj_id: Hashable
    text: str
    key: str


def by_model(items: Iterable[Item]) -> dict[str, list[Hashable]]:
    out: dict[str, list[Hashable]] = {}
    for item in items:
        out.setdefault(item.model, []).append(item.obj_id)
    return out


class CacheConflictStore:
    """Locks through the cache API, one key at a time: the backend for caches without a batched
    one (Memcached, Django's ``RedisCache``). A conflict rolls back what was added; the tracking
    set is rewritten under a short ``cache.add`` mutex."""

    kind = "cache"
    batch_size = 1000

    def __init__(self, manager: Any, ttl: int | None = None) -> None:
        from otel_taskctx.cache import refusal

        self.manager, self.cache = manager, manager.cache
        self.ttl = lock_ttl(manager) if ttl is None else ttl
        self.model_prefix = manager.conflict_model_prefix
        self.tracking_prefix = manager.conflict_prefix
        #: why this cache would lose locks for certain (then every reservation is refused)
        self.refusal = refusal(getattr(manager, "cache_name", "?"), self.cache)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.kind} ttl={self.ttl}>"

    def tracking_key(self, task_key: str) -> str:
        return f"{self.tracking_prefix}{task_key}"

    def items(self, conflict_ids: Ids) -> list[Item]:
        """The requested locks, grouped by model, each key once."""
        out = []
        for model, ids in conflict_ids.items():
            prefix = f"{self.model_prefix}{model}:"
            out += [Item(model, i, str(i), f"{prefix}{i}") for i in normalise_ids(ids)]
        return out

    def _guard(self, what: str, call: Callable[..., Any], *args: Any) -> Any:
        try:
            return call(*args)
        except (DescendantConflict, ConflictStoreUnavailable):
            raise
        except Exception as exc:
            raise ConflictStoreUnavailable(f"could not {what} ({self.kind} store): {exc}") from exc

    def reserve(self, task_key: str, conflict_ids: Ids) -> Reservation:
        """Lock every id for ``task_key``, or none (DescendantConflict names the holders); ids
        the task holds are fine, their TTL refreshed. ConflictStoreUnavailable: no cache."""
        items = self.items(conflict_ids)
        if not items:
            return Reservation(task_key)
        if self.refusal:
            raise ConflictStoreUnavailable(self.refusal)
        reserved_here.add(task_key)  # (before: a partial reservation is released too)
        what = f"reserve descendants for task {task_key}"
        fresh, held = self._guard(what, self._reserve, task_key, items)
        return Reservation(task_key, by_model(fresh), by_model(held))

    def holders(self, conflict_ids: Ids) -> Holders:
        """``{model: {id: holder}}`` for the ids that are locked."""
        out: Holders = {}
        for batch in batched(self.items(conflict_ids), self.batch_size):
            values = self.cache.get_many([i.key for i in batch])
            for item in batch:
                if values.get(item.key) is not None:
                    out.setdefault(item.model, {})[item.obj_id] = str(values[item.key])
        return out

    def tracked_keys(self, task_key: str) -> set[str]:
        """The lock keys in the task's tracking set (what powercrud's cleanup deletes)."""
        return set(self.cache.get(self.tracking_key(task_key)) or ())

    def release(self, task_key: str) -> int:
        """Delete the task's locks it still holds (compare-and-delete), then its tracking set.
        Returns the number of locks deleted."""
        return self._guard(f"release the locks of task {task_key}", self._release, task_key)

    def refresh(self, task_key: str, ttl: int | None = None) -> int:
        """A fresh TTL for every lock the task still holds (and its tracking set)."""
        ttl = self.ttl if ttl is None else ttl
        if ttl is None:
            return 0
        return self._guard(f"refresh the locks of task {task_key}", self._refresh, task_key, ttl)

    def conflict(self, task_key: str, items: list[Item], known: Holders) -> DescendantConflict:
        """The conflict naming every requested id another task holds now (else ``known``)."""
        held = self.holders(by_model(items))
        found = {m: {i: h for i, h in ids.items() if h != task_key} for m, ids in held.items()}
        return DescendantConflict(task_key, {m: c for m, c in found.items() if c} or known)

    def _reserve(self, task_key: str, items: list[Item]) -> tuple[list[Item], list[Item]]:
        cache, ttl = self.cache, self.ttl
        fresh: list[Item] = []
        held: list[Item] = []
        try:
            for item in items:
                if cache.add(item.key, task_key, ttl):
                    fresh.append(item)
                    continue
                holder = cache.get(item.key)
                if holder == task_key:
                    held.append(item)
                elif holder is None and cache.add(item.key, task_key, ttl):
                    fresh.append(item)  # the holder's lock expired in between
                else:
                    raise self.conflict(task_key, items, {item.model: {item.obj_id: str(holder)}})
            if fresh:
                with self._mutex(task_key):
                    tracked = self.tracked_keys(task_key) | {i.key for i in fresh}
                    cache.set(self.tracking_key(task_key), tracked, ttl)
        except BaseException:
            for item in fresh:
                if cache.get(item.key) == task_key:
                    cache.delete(item.key)
            raise
        for item in held:
            cache.touch(item.key, ttl)
        return fresh, held

    def _release(self, task_key: str) -> int:
        with self._mutex(task_key):
            keys = list(self.tracked_keys(task_key))
            mine = [k for k, v in self.cache.get_many(keys).items() if v == task_key]
            self.cache.delete_many(mine)
            self.cache.delete(self.tracking_key(task_key))
        return len(mine)

    def _refresh(self, task_key: str, ttl: int) -> int:
        values = self.cache.get_many(list(self.tracked_keys(task_key)))
        count = sum(1 for k, v in values.items() if v == task_key and self.cache.touch(k, ttl))
        self.cache.touch(self.tracking_key(task_key), ttl)
        return count

    @contextmanager
    def _mutex(self, task_key: str) -> Iterator[None]:
        """A short mutual exclusion through ``cache.add`` (held 30 s at most, waited 10 s)."""
        key, token = f"{self.tracking_key(task_key)}:mutex", uuid.uuid4().hex
        deadline, pause = time.monotonic() + 10, 0.001
        while not self.cache.add(key, token, 30):
            if time.monotonic() > deadline:
                raise ConflictStoreUnavailable(f"timed out waiting for {key}")
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
        try:
            yield
        finally:
            if self.cache.get(key) == token:
                self.cache.delete(key)
