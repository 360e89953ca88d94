"""The store-independent part of the conflict store and its generic (per-key) backend.

Locks use powercrud's own format, so its ``check_conflict`` sees them and its completion hook
(``remove_conflict_ids``) and ``pcrud_cleanup_async`` release them with the task's other
locks:

* lock key ``powercrud:conflict:model:<app_label.modelname>:<id>`` -> holder task key
* tracking set ``powercrud:async:conflict:<task key>`` -> python ``set`` of lock keys
  (read by powercrud with ``cache.get``)

The Redis backend writes the tracking set as a pickle that can be *appended to* (see
:mod:`otel_taskctx.conflicts.tracking`), so its script adds lock keys to it atomically in the
round trip that takes the locks; the database backend rewrites it under the tracking row's
lock, in the transaction that takes the locks.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from otel_taskctx.conflicts.tracking import chunked
from otel_taskctx.errors import ConflictStoreUnavailable, DescendantConflict

log = logging.getLogger("otel_taskctx.conflicts")

#: task keys this process reserved locks for: a ``django.tasks`` task that reserved none (and
#: fanned nothing out) has nothing to release, and its end asks the store nothing
reserved_here: set[str] = set()


# ---------------------------------------------------------------------------------------------
# ids and results
# ---------------------------------------------------------------------------------------------
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


_SIMPLE_PK = frozenset({int, str, uuid.UUID})


class _Item:
    """One requested lock: model label, id as given, id text, powercrud's (unprefixed) key."""

    __slots__ = ("model", "obj_id", "text", "key")

    def __init__(self, model: str, obj_id: Hashable, text: str, key: str) -> None:
        self.model, self.obj_id, self.text, self.key = model, obj_id, text, key


class _Group:
    """The requested ids of one model: ids as given and their texts, deduplicated by text."""

    __slots__ = ("model", "prefix", "obj_ids", "texts")

    def __init__(self, model: str, prefix: str, obj_ids: list[Hashable], texts: list[str]):
        self.model, self.prefix, self.obj_ids, self.texts = model, prefix, obj_ids, texts


def _group_ids(ids: Iterable[Hashable]) -> tuple[list[Hashable], list[str]]:
    if isinstance(ids, (str, bytes)):
        raise TypeError("ids must be an iterable of primary keys, not a single string")
    ids = list(ids)
    if not all(type(i) in _SIMPLE_PK for i in ids):  # the rare path: check every id
        ids = normalise_ids(ids)
    texts = list(map(str, ids))
    if len(set(texts)) == len(texts):
        return ids, texts
    by_text = dict(zip(texts, ids, strict=True))  # "1" and 1 are one lock
    return list(by_text.values()), list(by_text)


def lock_ttl(manager: Any) -> int | None:
    """Seconds a lock lives without refresh: ``OTEL_TASKCTX["LOCK_TTL"]`` or powercrud's."""
    try:
        from otel_taskctx.conf import get_setting

        value = get_setting("LOCK_TTL")
    except Exception:  # settings not configured: powercrud's value
        value = None
    if value is None:
        value = getattr(manager, "conflict_ttl", 3600)
    return None if value is None else int(value)


def _refusal(manager: Any, cache: Any) -> str | None:
    from otel_taskctx.cache import lock_loss, refusal

    reason = lock_loss(cache)
    return refusal(getattr(manager, "cache_name", "?"), cache, reason) if reason else None


class CacheConflictStore:
    """Locks through the manager's Django cache API: works with any cache, one key at a time.

    This is the fallback for caches without a batched backend (Memcached, Django's own
    ``RedisCache``, other databases). Reservation is all-or-nothing by rolling back what it
    added; the tracking set is updated under a short cache mutex (``cache.add``), so two
    registrations for one task do not lose each other's keys.
    """

    kind = "cache"
    #: seconds a tracking-set mutex is held at most / waited for at most
    mutex_ttl = 30
    mutex_wait = 10.0

    def __init__(self, manager: Any, ttl: int | None = None) -> None:
        self.manager = manager
        self.cache = manager.cache
        self.ttl = lock_ttl(manager) if ttl is None else ttl
        self.model_prefix = manager.conflict_model_prefix
        self.tracking_prefix = manager.conflict_prefix
        #: why this cache would lose locks for certain (then every reservation is refused)
        self.refusal = _refusal(manager, self.cache)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.kind} ttl={self.ttl}>"

    # keys ------------------------------------------------------------------------------------
    def lock_key(self, model: str, obj_id: Hashable) -> str:
        return f"{self.model_prefix}{model}:{obj_id}"

    def tracking_key(self, task_key: str) -> str:
        return f"{self.tracking_prefix}{task_key}"

    def _groups(self, conflict_ids: Mapping[str, Iterable[Hashable]]) -> list[_Group]:
        groups = []
        for model, ids in conflict_ids.items():
            obj_ids, texts = _group_ids(ids)
            if texts:
                groups.append(_Group(model, f"{self.model_prefix}{model}:", obj_ids, texts))
        return groups

    def _items(self, conflict_ids: Mapping[str, Iterable[Hashable]]) -> list[_Item]:
        """The requested locks, grouped by model, each key once."""
        return [
            _Item(g.model, obj_id, text, g.prefix + text)
            for g in self._groups(conflict_ids)
            for obj_id, text in zip(g.obj_ids, g.texts, strict=True)
        ]

    # public API ------------------------------------------------------------------------------
    def reserve(self, task_key: str, conflict_ids: Mapping[str, Iterable[Hashable]]) -> Reservation:
        """Lock every id for ``task_key``, or none: raises DescendantConflict naming holders.

        Ids the task already holds are not a conflict (their TTL is refreshed) and are never
        rolled back. Raises ConflictStoreUnavailable when the cache cannot be used.
        """
        groups = self._groups(conflict_ids)
        result = Reservation(task_key)
        if not groups:
            return result
        if self.refusal:
            raise ConflictStoreUnavailable(self.refusal)
        reserved_here.add(task_key)  # (before: a partial reservation is released too)
        try:
            result.reserved, result.already_held = self._reserve_groups(task_key, groups)
        except DescendantConflict:
            raise
        except ConflictStoreUnavailable:
            raise
        except Exception as exc:
            raise ConflictStoreUnavailable(
                f"could not reserve descendants for task {task_key} ({self.kind} store): {exc}"
            ) from exc
        return result

    def _reserve_groups(
        self, task_key: str, groups: list[_Group]
    ) -> tuple[dict[str, list[Hashable]], dict[str, list[Hashable]]]:
        """``({model: new ids}, {model: ids the task already held})``; per-item backends
        implement :meth:`_reserve` instead."""
        items = [
            _Item(g.model, obj_id, text, g.prefix + text)
            for g in groups
            for obj_id, text in zip(g.obj_ids, g.texts, strict=True)
        ]
        fresh, held = self._reserve(task_key, items)
        return _by_model(fresh), _by_model(held)

    def holders(
        self, conflict_ids: Mapping[str, Iterable[Hashable]]
    ) -> dict[str, dict[Hashable, str]]:
        """``{model: {id: holder}}`` for the ids that are locked."""
        out: dict[str, dict[Hashable, str]] = {}
        items = self._items(conflict_ids)
        for batch in chunked(items, 1000):
            values = self.cache.get_many([i.key for i in batch])
            for item in batch:
                holder = values.get(item.key)
                if holder is not None:
                    out.setdefault(item.model, {})[item.obj_id] = str(holder)
        return out

    def tracked_keys(self, task_key: str) -> set[str]:
        """The lock keys in the task's tracking set (what powercrud's cleanup will delete)."""
        value = self.cache.get(self.tracking_key(task_key))
        return set(value or ())

    def release(self, task_key: str) -> int:
        """Delete the task's locks that it still holds (compare-and-delete) and its tracking set.

        A lock that expired and was taken by another task is left alone. Returns the number
        of locks deleted.
        """
        try:
            return self._release(task_key)
        except Exception as exc:
            raise ConflictStoreUnavailable(
                f"could not release the locks of task {task_key}: {exc}"
            ) from exc

    def refresh(self, task_key: str, ttl: int | None = None) -> int:
        """Give every lock the task still holds (and its tracking set) a fresh TTL.

        Returns the number of locks refreshed.
        """
        ttl = self.ttl if ttl is None else ttl
        if ttl is None:
            return 0
        try:
            return self._refresh(task_key, ttl)
        except Exception as exc:
            raise ConflictStoreUnavailable(
                f"could not refresh the locks of task {task_key}: {exc}"
            ) from exc

    # conflicts -------------------------------------------------------------------------------
    def _raise_conflict(
        self,
        task_key: str,
        requested: Mapping[str, list[Hashable]],
        known: Mapping[str, Mapping[Hashable, str]] | None = None,
    ) -> None:
        """Raise DescendantConflict naming every requested id another task holds now.

        ``known`` is what the failed attempt saw; it is reported if the holders released
        their locks in between.
        """
        held = self.holders(requested)
        conflicts = {
            model: {i: h for i, h in ids.items() if h != task_key} for model, ids in held.items()
        }
        conflicts = {m: c for m, c in conflicts.items() if c}
        if not conflicts and known:
            conflicts = {m: dict(c) for m, c in known.items() if c}
        if not conflicts:  # pragma: no cover - nothing known: report it as contention
            raise ConflictStoreUnavailable(
                f"task {task_key}: descendants were briefly held by another task; try again"
            )
        raise DescendantConflict(task_key, conflicts)

    # the generic per-key implementation ------------------------------------------------------
    def _reserve(self, task_key: str, items: list[_Item]) -> tuple[list[_Item], list[_Item]]:
        cache, ttl = self.cache, self.ttl
        fresh: list[_Item] = []
        held: list[_Item] = []
        conflicted: dict[str, dict[Hashable, str]] = {}
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
                    conflicted = {item.model: {item.obj_id: str(holder)}}
                    break
            if not conflicted and fresh:
                with self._tracking_mutex(task_key):
                    tracking = self.tracking_key(task_key)
                    existing = cache.get(tracking) or set()
                    cache.set(tracking, set(existing) | {i.key for i in fresh}, ttl)
        except BaseException:
            self._rollback_keys(task_key, [i.key for i in fresh])
            raise
        if conflicted:
            self._rollback_keys(task_key, [i.key for i in fresh])
            self._raise_conflict(task_key, _by_model(items), conflicted)
        for item in held:
            cache.touch(item.key, ttl)
        return fresh, held

    def _rollback_keys(self, task_key: str, keys: list[str]) -> None:
        for key in keys:
            try:
                if self.cache.get(key) == task_key:
                    self.cache.delete(key)
            except Exception:  # the lock will expire with its TTL
                log.warning("could not roll back lock %s of task %s", key, task_key)

    def _tracking_mutex(self, task_key: str) -> _CacheMutex:
        return _CacheMutex(
            self.cache, f"{self.tracking_key(task_key)}:mutex", self.mutex_ttl, self.mutex_wait
        )

    def _release(self, task_key: str) -> int:
        cache = self.cache
        with self._tracking_mutex(task_key):
            keys = self.tracked_keys(task_key)
            mine = (
                [k for k, v in cache.get_many(list(keys)).items() if v == task_key] if keys else []
            )
            if mine:
                cache.delete_many(mine)
            cache.delete(self.tracking_key(task_key))
        return len(mine)

    def _refresh(self, task_key: str, ttl: int) -> int:
        cache = self.cache
        keys = self.tracked_keys(task_key)
        count = 0
        for key, value in (cache.get_many(list(keys)) if keys else {}).items():
            if value == task_key and cache.touch(key, ttl):
                count += 1
        cache.touch(self.tracking_key(task_key), ttl)
        return count


def _by_model(items: list[_Item]) -> dict[str, list[Hashable]]:
    out: dict[str, list[Hashable]] = {}
    for item in items:
        out.setdefault(item.model, []).append(item.obj_id)
    return out


class _CacheMutex:
    """A short mutual exclusion through ``cache.add`` (any shared Django cache)."""

    def __init__(self, cache: Any, key: str, ttl: int, wait: float) -> None:
        self.cache, self.key, self.ttl, self.wait = cache, key, ttl, wait
        self.token = uuid.uuid4().hex

    def __enter__(self) -> _CacheMutex:
        deadline = time.monotonic() + self.wait
        pause = 0.001
        while not self.cache.add(self.key, self.token, self.ttl):
            if time.monotonic() > deadline:
                raise ConflictStoreUnavailable(f"timed out waiting for {self.key}")
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.cache.get(self.key) == self.token:
                self.cache.delete(self.key)
        except Exception:  # expires with its TTL
            log.warning("could not release %s", self.key)
