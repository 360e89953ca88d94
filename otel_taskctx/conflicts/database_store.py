"""The database backend of the conflict store: our lock model, through the ORM.

Used where powercrud's cache is a :class:`otel_taskctx.cache.LockCache`. Locks and tracking sets
are :class:`otel_taskctx.models.DescendantLock` rows in the cache's key and value encoding, so
powercrud's ``cache.get`` / ``cache.delete`` see them. One transaction per reservation, the
task's tracking row locked first (see docs/conflicts.md, *Storage*).
"""

from __future__ import annotations

import time
from itertools import batched
from typing import Any

from django.db import IntegrityError, OperationalError, connections, transaction
from django.db.models import F
from django.utils.timezone import now

from otel_taskctx.cache import LockCache, decode, encode, lock_db, locks, purge_expired
from otel_taskctx.conflicts.base import CacheConflictStore, Item
from otel_taskctx.errors import ConflictStoreUnavailable, DescendantConflict


class _Retry(Exception):
    """A row changed under the transaction: roll back and start over."""


def supports(cache: Any, manager: Any) -> bool:
    """Are the manager's lock keys and tracking sets rows of our model, on a database that
    ignores conflicting inserts?"""
    if not isinstance(cache, LockCache):
        return False
    prefixes = (f"{manager.conflict_model_prefix}x:1", f"{manager.conflict_prefix}x")
    return all(map(cache.is_lock_key, prefixes)) and bool(
        connections[lock_db()].features.supports_ignore_conflicts
    )


class DatabaseConflictStore(CacheConflictStore):
    """All-or-nothing reservations in one transaction, ``batch_size`` rows per statement."""

    kind = "database"
    batch_size = 2000
    attempts = 8

    def __init__(self, manager: Any, ttl: int | None = None) -> None:
        super().__init__(manager, ttl)
        self.db = lock_db()

    def _reserve(self, task_key: str, items: list[Item]) -> tuple[list[Item], list[Item]]:
        for attempt in range(self.attempts):
            try:
                return self._reserve_once(task_key, items)
            except (_Retry, IntegrityError):
                pass
            except OperationalError as exc:  # a PostgreSQL deadlock or serialization failure
                if getattr(exc.__cause__, "sqlstate", None) not in ("40P01", "40001"):
                    raise
            time.sleep(0.005 * (attempt + 1))
        raise ConflictStoreUnavailable(
            f"task {task_key}: lock rows kept changing under the reservation; try again"
        )

    def _reserve_once(self, task_key: str, items: list[Item]) -> tuple[list[Item], list[Item]]:
        from otel_taskctx.models import DescendantLock

        rows, holder = locks(self.db), encode(task_key)
        moment, exp = now(), self.cache.expiry(self.ttl)
        by_key = {self.cache.make_key(i.key): i for i in items}
        tracking = self.cache.make_key(self.tracking_key(task_key))
        fresh: list[str] = []
        held: list[str] = []
        others: dict[str, dict[Any, str]] = {}
        with transaction.atomic(using=self.db):
            # the tracking row first (SQLite's write lock, PostgreSQL's row lock): registrations
            # of one task queue up instead of deadlocking; an expired one starts empty
            rows.filter(cache_key=tracking, expires__lt=moment).delete()
            empty = DescendantLock(cache_key=tracking, value=encode(set()), expires=exp)
            rows.bulk_create([empty], ignore_conflicts=True)
            tracked = rows.select_for_update().filter(cache_key=tracking)
            tracked_value, tracked_exp = tracked.values_list("value", "expires").get()
            for batch in batched(sorted(by_key), self.batch_size):
                live = rows.select_for_update().filter(cache_key__in=batch, expires__gte=moment)
                found = dict(live.order_by("cache_key").values_list("cache_key", "value"))
                for key in batch:
                    value = found.get(key)
                    if value is None:
                        fresh.append(key)
                    elif value == holder or decode(value) == task_key:
                        held.append(key)
                    else:
                        item = by_key[key]
                        others.setdefault(item.model, {})[item.obj_id] = str(decode(value))
            if others:
                raise DescendantConflict(task_key, others)  # (rolls the tracking row back)
            for batch in batched(fresh, self.batch_size):
                rows.filter(cache_key__in=batch, expires__lt=moment).delete()  # expired ones
                if self._insert(batch, holder, exp) != len(batch):
                    raise _Retry()  # another transaction took one since we read them
            for batch in batched(held, self.batch_size):  # ours already: a fresh TTL
                rows.filter(cache_key__in=batch, expires__lt=exp).update(expires=exp)
            if fresh or tracked_exp < exp:
                keys = set(decode(tracked_value) or ()) | {by_key[k].key for k in fresh}
                rows.filter(cache_key=tracking).update(
                    value=encode(keys), expires=max(tracked_exp, exp)
                )
        purge_expired(self.db)
        return [by_key[k] for k in fresh], [by_key[k] for k in held]

    def _insert(self, keys: tuple[str, ...], holder: str, exp: Any) -> int:
        """Insert lock rows for ``keys`` where none is; the number inserted. On SQLite and
        PostgreSQL one ``INSERT ... ON CONFLICT DO NOTHING`` run per row by the driver: the
        ORM's ``bulk_create`` builds its statement in Python, 4x slower at 10,000 locks."""
        from otel_taskctx.models import DescendantLock

        connection = connections[self.db]
        if connection.vendor not in ("sqlite", "postgresql"):
            new = [DescendantLock(cache_key=k, value=holder, expires=exp) for k in keys]
            locks(self.db).bulk_create(new, ignore_conflicts=True)
            return locks(self.db).filter(cache_key__in=keys, value=holder).count()
        expires = connection.ops.adapt_datetimefield_value(exp)
        with connection.cursor() as cursor:
            cursor.executemany(
                f"INSERT INTO {DescendantLock._meta.db_table} (cache_key, value, expires) "
                "VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                [(key, holder, expires) for key in keys],
            )
            return cursor.rowcount

    def _release(self, task_key: str) -> int:
        return self._on_tracked_locks(
            task_key, lambda mine: mine.delete()[0], lambda tracking: tracking.delete()
        )

    def _refresh(self, task_key: str, ttl: int) -> int:
        exp = self.cache.expiry(ttl)
        return self._on_tracked_locks(
            task_key,
            lambda mine: mine.update(expires=exp),
            lambda tracking: tracking.filter(expires__lt=exp).update(expires=exp),
        )

    def _on_tracked_locks(self, task_key: str, on_mine: Any, on_tracking: Any) -> int:
        """``on_mine`` on the tracked locks the task still holds (the compare-and-act), then
        ``on_tracking`` on its tracking row, in one transaction; no write for a task that
        never took a lock (most jobs: on SQLite every process queues on the write lock)."""
        rows = locks(self.db)
        tracking = rows.filter(cache_key=self.cache.make_key(self.tracking_key(task_key)))
        if not tracking.exists():
            return 0
        holder, count = encode(task_key), 0
        with transaction.atomic(using=self.db):
            tracking.update(expires=F("expires"))  # a write first: the write lock, the row lock
            value = tracking.values_list("value", flat=True).first()
            keys = sorted(self.cache.make_key(k) for k in (decode(value) or ())) if value else []
            for batch in batched(keys, self.batch_size):
                count += on_mine(rows.filter(cache_key__in=batch, value=holder))
            on_tracking(tracking)
        return count
