"""The database backend of the conflict store: set-based statements on our lock model.

Used where powercrud's cache is a :class:`otel_taskctx.cache.LockCache` (the lock-safe view of
Django's ``DatabaseCache``, or :class:`otel_taskctx.cache.DatabaseCache`) on SQLite or
PostgreSQL. Locks and tracking sets are :class:`otel_taskctx.models.DescendantLock` rows in
the cache's key and value encoding, so powercrud's ``cache.get``/``cache.delete`` see them.

One transaction per reservation: the task's tracking row first (SQLite's write lock,
PostgreSQL's row lock: registrations of one task queue up instead of deadlocking), then every
id taken at once (:meth:`DatabaseConflictStore._take`); if some are held, the reservation
starts over reading them first (``FOR UPDATE`` on PostgreSQL) to tell its own (re-entrant)
from another task's (a conflict, rolled back). The tracking set is rewritten under the
tracking row's lock, so concurrent registrations of one task never lose each other's keys.
Everything but :meth:`~DatabaseConflictStore._take` is the ORM.
"""

from __future__ import annotations

import time
from typing import Any

from django.db import IntegrityError, OperationalError, connections, transaction
from django.db.models import F
from django.utils.timezone import now

from otel_taskctx.cache import LockCache, decode, encode, lock_db, locks, purge_expired
from otel_taskctx.conflicts.base import CacheConflictStore, _Item
from otel_taskctx.conflicts.tracking import chunked
from otel_taskctx.errors import ConflictStoreUnavailable, DescendantConflict

VENDORS = ("sqlite", "postgresql")


class _Contention(Exception):
    """A row changed under the transaction: roll back and start over."""


class _Taken(Exception):
    """Some ids are held already (by this task or another): read them before taking."""


class _Conflict(Exception):
    def __init__(self, conflicts: dict[str, dict[Any, str]]) -> None:
        self.conflicts = conflicts


def supports(cache: Any, manager: Any) -> bool:
    if not isinstance(cache, LockCache):
        return False
    if not (
        cache.is_lock_key(f"{manager.conflict_model_prefix}x:1")
        and cache.is_lock_key(f"{manager.conflict_prefix}x")
    ):
        return False  # locks or tracking sets elsewhere: generic path
    return connections[lock_db()].vendor in VENDORS


def _is_deadlock(exc: BaseException) -> bool:
    cause = exc.__cause__
    return getattr(cause, "sqlstate", None) in ("40P01", "40001") or "deadlock" in str(exc)


class DatabaseConflictStore(CacheConflictStore):
    """All-or-nothing reservations with set-based statements, in one transaction."""

    kind = "database"
    #: rows per statement
    batch_size = 2000
    attempts = 8

    def __init__(self, manager: Any, ttl: int | None = None) -> None:
        super().__init__(manager, ttl)
        self.db = lock_db()
        # Django's default KEY_FUNCTION prepends "<prefix>:<version>:": build keys by
        # concatenation instead of validating 10,000 keys one by one
        self._key_prefix: str | None = self.cache.make_key("")
        probe = self.lock_key("probe.model", "x-1")
        if self.cache.make_and_validate_key(probe) != self._key_prefix + probe:
            self._key_prefix = None

    def _db_key(self, key: str) -> str:
        if self._key_prefix is not None and len(key) < 200:
            return self._key_prefix + key
        return self.cache.make_and_validate_key(key)

    # reserve ---------------------------------------------------------------------------------
    def _reserve(self, task_key: str, items: list[_Item]) -> tuple[list[_Item], list[_Item]]:
        optimistic = True  # first: take every id at once, without reading them
        for attempt in range(self.attempts):
            try:
                return self._reserve_once(task_key, items, optimistic)
            except _Conflict as exc:
                raise DescendantConflict(task_key, exc.conflicts) from None
            except _Taken:
                optimistic = False  # some are held (by us or another task): read them first
                continue
            except (_Contention, IntegrityError):
                pass
            except OperationalError as exc:
                if not _is_deadlock(exc):
                    raise
            time.sleep(0.005 * (attempt + 1))
        raise ConflictStoreUnavailable(
            f"task {task_key}: lock rows kept changing under the reservation; try again"
        )

    def _reserve_once(
        self, task_key: str, items: list[_Item], optimistic: bool
    ) -> tuple[list[_Item], list[_Item]]:
        from otel_taskctx.models import DescendantLock

        rows = locks(self.db)
        holder = encode(task_key)
        moment, exp = now(), self.cache.expiry(self.ttl)
        by_key = {self._db_key(i.key): i for i in items}
        keys = sorted(by_key)
        tracking = self._db_key(self.tracking_key(task_key))
        held: list[str] = []
        with transaction.atomic(using=self.db):
            # 1. the tracking row first (write lock / row lock; an expired one starts empty)
            rows.filter(cache_key=tracking, expires__lt=moment).delete()
            empty = DescendantLock(cache_key=tracking, value=encode(set()), expires=exp)
            rows.bulk_create([empty], ignore_conflicts=True)
            tracked = rows.select_for_update().filter(cache_key=tracking)
            tracked_value, tracked_exp = tracked.values_list("value", "expires").get()
            if optimistic:  # 2a. take them all; one held already sends us to 2b
                fresh = keys
                for batch in chunked(keys, self.batch_size):
                    if self._take(batch, holder, exp, moment) != len(batch):
                        raise _Taken()
            else:  # 2b. who holds what, then take the free ones
                fresh, held = self._classify(task_key, holder, by_key, keys, moment)
                for batch in chunked(fresh, self.batch_size):
                    if self._take(batch, holder, exp, moment) != len(batch):
                        raise _Contention()  # another transaction was faster
                for batch in chunked(held, self.batch_size):  # ours already: fresh TTL
                    rows.filter(cache_key__in=batch, expires__lt=exp).update(expires=exp)
            # 3. the new lock keys join the tracking set
            if fresh or tracked_exp < exp:
                tracked_keys = set(decode(tracked_value) or ()) | {by_key[k].key for k in fresh}
                rows.filter(cache_key=tracking).update(
                    value=encode(tracked_keys), expires=max(tracked_exp, exp)
                )
        purge_expired(self.db)
        return [by_key[k] for k in fresh], [by_key[k] for k in held]

    def _classify(
        self, task_key: str, holder: str, by_key: dict[str, _Item], keys: list[str], moment: Any
    ) -> tuple[list[str], list[str]]:
        """``(free keys, keys the task holds)``; raises _Conflict naming the other holders."""
        fresh: list[str] = []
        held: list[str] = []
        conflicts: dict[str, dict[Any, str]] = {}
        for batch in chunked(keys, self.batch_size):
            found = dict.fromkeys(batch)
            query = locks(self.db).select_for_update().filter(cache_key__in=batch)
            for key, value, expires in query.order_by("cache_key").values_list(
                "cache_key", "value", "expires"
            ):
                found[key] = (value, expires)
            for key, row in found.items():
                if row is None or row[1] < moment:
                    fresh.append(key)
                elif row[0] == holder or decode(row[0]) == task_key:
                    held.append(key)
                else:
                    item = by_key[key]
                    conflicts.setdefault(item.model, {})[item.obj_id] = str(decode(row[0]))
        if conflicts:
            raise _Conflict(conflicts)  # rolls back the tracking row too
        return fresh, held

    def _take(self, keys: list[str], holder: str, exp: Any, moment: Any) -> int:
        """Lock ``keys`` for ``holder`` where they are absent or expired, in one statement;
        returns how many rows it wrote (short: some are held).

        The one statement in raw SQL: an atomic add-or-take-over-if-expired of many rows,
        ``INSERT ... ON CONFLICT DO UPDATE ... WHERE expires < now``, which the ORM's
        ``bulk_create(update_conflicts=True)`` cannot make conditional (and costs ~20 us a
        row in the compiler: 8x the whole reservation at 10,000 ids).
        """
        from otel_taskctx.models import DescendantLock

        connection = connections[self.db]
        field = DescendantLock._meta.get_field("expires")
        exp, moment = (field.get_db_prep_value(t, connection) for t in (exp, moment))
        table = f'"{DescendantLock._meta.db_table}"'  # standard SQL quoting, both vendors
        with connection.cursor() as cursor:
            cursor.execute(
                f'INSERT INTO {table} ("cache_key", "value", "expires") VALUES '
                + ", ".join(["(%s, %s, %s)"] * len(keys))
                + ' ON CONFLICT ("cache_key") DO UPDATE SET "value" = excluded."value", '
                f'"expires" = excluded."expires" WHERE {table}."expires" < %s',
                [p for k in keys for p in (k, holder, exp)] + [moment],
            )
            return cursor.rowcount

    # release / refresh -----------------------------------------------------------------------
    def _release(self, task_key: str) -> int:
        return self._on_tracked_locks(
            task_key,
            lambda mine: mine.delete()[0],
            lambda tracking: tracking.delete(),
        )

    def _refresh(self, task_key: str, ttl: int) -> int:
        exp = self.cache.expiry(ttl)
        return self._on_tracked_locks(
            task_key,
            lambda mine: mine.update(expires=exp),
            lambda tracking: tracking.filter(expires__lt=exp).update(expires=exp),
        )

    def _on_tracked_locks(self, task_key: str, on_mine: Any, on_tracking: Any) -> int:
        """``on_mine`` (a queryset of the task's tracked locks that it still holds: the
        compare-and-act) in batches, then ``on_tracking`` on the tracking row; one
        transaction. Returns the number of lock rows ``on_mine`` touched."""
        rows = locks(self.db)
        tracking = rows.filter(cache_key=self._db_key(self.tracking_key(task_key)))
        if not tracking.exists():
            # the task never took a lock (most jobs): nothing to act on, and no write
            # transaction (on SQLite, the one write lock every process of a cluster queues on)
            return 0
        holder = encode(task_key)
        count = 0
        with transaction.atomic(using=self.db):
            # a write first: SQLite's write lock, PostgreSQL's row lock
            tracking.update(expires=F("expires"))
            value = tracking.values_list("value", flat=True).first()
            keys = sorted(self._db_key(k) for k in (decode(value) or ())) if value else []
            for batch in chunked(keys, self.batch_size):
                count += on_mine(rows.filter(cache_key__in=batch, value=holder))
            on_tracking(tracking)
        return count
