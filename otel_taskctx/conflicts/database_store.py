"""The database backend of the conflict store: set-based SQL on the cache's own table.

Used for Django's ``DatabaseCache`` (and :class:`otel_taskctx.cache.DatabaseCache`, whose lock
table has the same schema) on SQLite and PostgreSQL. Rows are written exactly as the cache
writes them (``base64(pickle(value))``, the same ``expires`` encoding), so powercrud's
``cache.get``/``cache.delete`` read and release them.

One transaction per reservation:

1. upsert the task's tracking row: this takes SQLite's write lock and PostgreSQL's row lock,
   so registrations of one task queue up instead of deadlocking on each other's lock rows;
2. read the requested lock rows in batches (``SELECT ... FOR UPDATE`` on PostgreSQL): ids
   held by another task are a conflict and the transaction is rolled back;
3. ``INSERT ... ON CONFLICT DO UPDATE ... WHERE expires < now`` for the free ids, a batch of
   ``batch_size`` rows per statement; a row another transaction took meanwhile makes the row
   count come up short, the transaction is rolled back and the reservation starts over;
4. append the new lock keys to the tracking set in place (its base64 text is appendable, see
   :func:`otel_taskctx.conflicts.tracking.encode_tracking`).
"""

from __future__ import annotations

import base64
import logging
import pickle
import threading
import time
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.db import OperationalError, connections, router, transaction
from django.utils.timezone import now as tz_now

from otel_taskctx.conflicts.base import CacheConflictStore, _Item
from otel_taskctx.conflicts.tracking import (
    TRACKING_HEADER,
    TRACKING_TAIL,
    chunked,
    encode_tracking,
    tracking_chunk,
)
from otel_taskctx.errors import ConflictStoreUnavailable, DescendantConflict

log = logging.getLogger("otel_taskctx.conflicts")

VENDORS = ("sqlite", "postgresql")
_TAIL_B64 = base64.b64encode(TRACKING_TAIL).decode("ascii")
_EMPTY_B64 = base64.b64encode(TRACKING_HEADER + TRACKING_TAIL).decode("ascii")
#: seconds between two purges of expired rows from the lock table (per process)
PURGE_INTERVAL = 300.0
_purged: dict[tuple[str, str], float] = {}
_purge_lock = threading.Lock()


class _Contention(Exception):
    """A row changed under the transaction: roll back and start over."""


class _Conflict(Exception):
    def __init__(self, conflicts: dict[str, dict[Any, str]]) -> None:
        self.conflicts = conflicts


def storage_for(cache: Any, key: str) -> Any:
    """The DatabaseCache (cache table or lock table) that holds ``key``."""
    pick = getattr(cache, "storage_for", None)
    return pick(key) if pick is not None else cache


def supports(cache: Any, manager: Any) -> bool:
    from django.core.cache.backends.db import DatabaseCache

    if not isinstance(cache, DatabaseCache):
        return False
    lock = storage_for(cache, f"{manager.conflict_model_prefix}x:1")
    if storage_for(cache, f"{manager.conflict_prefix}x") is not lock:
        return False  # locks and tracking sets in different tables: generic path
    db = router.db_for_write(lock.cache_model_class)
    return connections[db].vendor in VENDORS


def _is_deadlock(exc: BaseException) -> bool:
    cause = exc.__cause__
    return getattr(cause, "sqlstate", None) in ("40P01", "40001") or "deadlock" in str(exc)


class DatabaseConflictStore(CacheConflictStore):
    """All-or-nothing reservations with set-based statements, in one transaction."""

    kind = "database"
    #: rows per statement (3 parameters a row: SQLite allows 32766 parameters)
    batch_size = 2000
    attempts = 8

    def __init__(self, manager: Any, ttl: int | None = None) -> None:
        super().__init__(manager, ttl)
        self.storage = storage_for(self.cache, self.lock_key("x", 1))
        self.table = self.storage._table
        self.db = router.db_for_write(self.storage.cache_model_class)
        #: True when the rows live in a cache table Django culls (plain DatabaseCache)
        self.culled = self.storage is self.cache and not hasattr(self.cache, "lock_table")
        # Django's default KEY_FUNCTION prepends "<prefix>:<version>:": build keys by
        # concatenation instead of validating 10,000 keys one by one
        self._key_prefix: str | None = self.storage.make_key("")
        probe = self.lock_key("probe.model", "x-1")
        if self.storage.make_and_validate_key(probe) != self._key_prefix + probe:
            self._key_prefix = None

    # encoding --------------------------------------------------------------------------------
    def _encode(self, value: Any) -> str:
        return base64.b64encode(pickle.dumps(value, self.storage.pickle_protocol)).decode("latin1")

    def _decode(self, connection: Any, value: Any) -> Any:
        value = connection.ops.process_clob(value)
        return pickle.loads(base64.b64decode(value.encode(), validate=True))

    def _db_key(self, key: str) -> str:
        if self._key_prefix is not None and len(key) < 200:
            return self._key_prefix + key
        return self.storage.make_and_validate_key(key)

    def _times(self, connection: Any, ttl: int | None) -> tuple[Any, Any]:
        """(now, expiry) adapted for the database, encoded as the cache encodes them."""
        now = tz_now().replace(microsecond=0)
        timeout = self.storage.get_backend_timeout(ttl)
        if timeout is None:
            exp = datetime.max
        else:
            exp = datetime.fromtimestamp(timeout, tz=UTC if settings.USE_TZ else None)
        exp = exp.replace(microsecond=0)
        adapt = connection.ops.adapt_datetimefield_value
        return adapt(now), adapt(exp)

    def _sql(self, connection: Any) -> tuple[str, str, str, str]:
        qn = connection.ops.quote_name
        return qn(self.table), qn("cache_key"), qn("value"), qn("expires")

    # reserve ---------------------------------------------------------------------------------
    def _reserve(self, task_key: str, items: list[_Item]) -> tuple[list[_Item], list[_Item]]:
        for attempt in range(self.attempts):
            try:
                return self._reserve_once(task_key, items)
            except _Conflict as exc:
                raise DescendantConflict(task_key, exc.conflicts) from None
            except _Contention:
                pass
            except OperationalError as exc:
                if not _is_deadlock(exc):
                    raise
            time.sleep(0.005 * (attempt + 1))
        raise ConflictStoreUnavailable(
            f"task {task_key}: lock rows kept changing under the reservation; try again"
        )

    def _reserve_once(self, task_key: str, items: list[_Item]) -> tuple[list[_Item], list[_Item]]:
        connection = connections[self.db]
        table, key_col, value_col, exp_col = self._sql(connection)
        holder = self._encode(task_key)
        now, exp = self._times(connection, self.ttl)
        by_key = {self._db_key(i.key): i for i in items}
        keys = sorted(by_key)
        tracking = self._db_key(self.tracking_key(task_key))
        for_update = f" ORDER BY {key_col} FOR UPDATE"
        if not connection.features.has_select_for_update:
            for_update = ""
        fresh: list[str] = []
        held: list[str] = []
        conflicts: dict[str, dict[Any, str]] = {}
        with transaction.atomic(using=self.db), connection.cursor() as cursor:
            # 1. the tracking row first (write lock / row lock; an expired one starts empty)
            cursor.execute(
                f"INSERT INTO {table} ({key_col}, {value_col}, {exp_col}) VALUES (%s, %s, %s) "
                f"ON CONFLICT ({key_col}) DO UPDATE SET "
                f"{value_col} = CASE WHEN {table}.{exp_col} < %s THEN excluded.{value_col} "
                f"ELSE {table}.{value_col} END, "
                f"{exp_col} = CASE WHEN {table}.{exp_col} < excluded.{exp_col} "
                f"THEN excluded.{exp_col} ELSE {table}.{exp_col} END",
                [tracking, _EMPTY_B64, exp, now],
            )
            # 2. who holds what
            for batch in chunked(keys, self.batch_size):
                marks = ", ".join(["%s"] * len(batch))
                cursor.execute(
                    f"SELECT {key_col}, {value_col}, "
                    f"CASE WHEN {exp_col} < %s THEN 1 ELSE 0 END "
                    f"FROM {table} WHERE {key_col} IN ({marks}){for_update}",
                    [now, *batch],
                )
                found = {row[0]: row for row in cursor.fetchall()}
                for key in batch:
                    row = found.get(key)
                    if row is None or row[2]:
                        fresh.append(key)
                        continue
                    value = connection.ops.process_clob(row[1])
                    owner = task_key if value == holder else self._decode(connection, value)
                    if owner == task_key:
                        held.append(key)
                    else:
                        item = by_key[key]
                        conflicts.setdefault(item.model, {})[item.obj_id] = str(owner)
            if conflicts:
                raise _Conflict(conflicts)  # rolls back the tracking upsert too
            # 3. take the free ones; a short row count means someone else was faster
            for batch in chunked(fresh, self.batch_size):
                rows = ", ".join(["(%s, %s, %s)"] * len(batch))
                params = [p for key in batch for p in (key, holder, exp)]
                cursor.execute(
                    f"INSERT INTO {table} ({key_col}, {value_col}, {exp_col}) VALUES {rows} "
                    f"ON CONFLICT ({key_col}) DO UPDATE SET {value_col} = excluded.{value_col}, "
                    f"{exp_col} = excluded.{exp_col} WHERE {table}.{exp_col} < %s",
                    [*params, now],
                )
                if cursor.rowcount != len(batch):
                    raise _Contention()
            # 4. ids the task already held: fresh TTL
            for batch in chunked(held, self.batch_size):
                marks = ", ".join(["%s"] * len(batch))
                cursor.execute(
                    f"UPDATE {table} SET {exp_col} = %s "
                    f"WHERE {key_col} IN ({marks}) AND {exp_col} < %s",
                    [exp, *batch, exp],
                )
            # 5. the new lock keys join the tracking set
            if fresh:
                self._append_tracking(connection, cursor, tracking, [by_key[k].key for k in fresh])
        self._maybe_purge(connection)
        return [by_key[k] for k in fresh], [by_key[k] for k in held]

    def _append_tracking(
        self, connection: Any, cursor: Any, tracking: str, keys: list[str]
    ) -> None:
        table, key_col, value_col, _ = self._sql(connection)
        chunk = base64.b64encode(tracking_chunk(keys, align=True)).decode("ascii")
        cursor.execute(
            f"UPDATE {table} SET {value_col} = "
            f"SUBSTR({value_col}, 1, LENGTH({value_col}) - 4) || %s || %s "
            f"WHERE {key_col} = %s AND SUBSTR({value_col}, LENGTH({value_col}) - 3) = %s",
            [chunk, _TAIL_B64, tracking, _TAIL_B64],
        )
        if cursor.rowcount == 1:
            return
        # written by powercrud (a plain pickled set): rewrite it once in the appendable format
        cursor.execute(f"SELECT {value_col} FROM {table} WHERE {key_col} = %s", [tracking])
        row = cursor.fetchone()
        current = set(self._decode(connection, row[0]) or ()) if row else set()
        value = base64.b64encode(encode_tracking(sorted(current | set(keys)))).decode("ascii")
        cursor.execute(
            f"UPDATE {table} SET {value_col} = %s WHERE {key_col} = %s", [value, tracking]
        )

    def _maybe_purge(self, connection: Any) -> None:
        """Now and then, delete expired rows from our lock table (never culled otherwise)."""
        if self.culled:
            return
        marker = (self.db, self.table)
        now = time.monotonic()
        with _purge_lock:
            if now - _purged.get(marker, 0.0) < PURGE_INTERVAL:
                return
            _purged[marker] = now
        table, _, _, exp_col = self._sql(connection)
        try:
            with connection.cursor() as cursor:
                cursor.execute(
                    f"DELETE FROM {table} WHERE {exp_col} < %s",
                    [self._times(connection, None)[0]],
                )
        except Exception:  # pragma: no cover - best effort
            log.debug("could not purge expired locks", exc_info=True)

    # release / refresh -----------------------------------------------------------------------
    def _tracked_in_tx(self, connection: Any, cursor: Any, tracking: str) -> set[str]:
        table, key_col, value_col, exp_col = self._sql(connection)
        # a write first: SQLite's write lock, PostgreSQL's row lock
        cursor.execute(f"UPDATE {table} SET {exp_col} = {exp_col} WHERE {key_col} = %s", [tracking])
        cursor.execute(f"SELECT {value_col} FROM {table} WHERE {key_col} = %s", [tracking])
        row = cursor.fetchone()
        return set(self._decode(connection, row[0]) or ()) if row else set()

    def _has_tracking_row(self, connection: Any, tracking: str) -> bool:
        """Whether the task's tracking row exists (expired or not), read without a lock.

        A row that is absent here cannot matter to a release or a refresh: locks are only
        taken with the tracking row written in the same transaction, and a task's locks are
        released or refreshed by the task itself or after it ended.
        """
        table, key_col, _, _ = self._sql(connection)
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT 1 FROM {table} WHERE {key_col} = %s", [tracking])
            return cursor.fetchone() is not None

    def _release(self, task_key: str) -> int:
        table, key_col, value_col, _ = self._sql(connections[self.db])
        return self._on_tracked_locks(
            task_key,
            lambda marks: f"DELETE FROM {table} WHERE {key_col} IN ({marks}) AND {value_col} = %s",
            lambda batch, holder: [*batch, holder],
            lambda tracking: (f"DELETE FROM {table} WHERE {key_col} = %s", [tracking]),
        )

    def _refresh(self, task_key: str, ttl: int) -> int:
        connection = connections[self.db]
        table, key_col, value_col, exp_col = self._sql(connection)
        _, exp = self._times(connection, ttl)
        return self._on_tracked_locks(
            task_key,
            lambda marks: (
                f"UPDATE {table} SET {exp_col} = %s "
                f"WHERE {key_col} IN ({marks}) AND {value_col} = %s"
            ),
            lambda batch, holder: [exp, *batch, holder],
            lambda tracking: (
                f"UPDATE {table} SET {exp_col} = CASE WHEN {exp_col} < %s THEN %s "
                f"ELSE {exp_col} END WHERE {key_col} = %s",
                [exp, exp, tracking],
            ),
        )

    def _on_tracked_locks(self, task_key, batch_sql, batch_params, tracking_statement) -> int:
        """Run ``batch_sql`` (compare-and-act on the holder) over the task's tracked lock keys,
        in batches, then ``tracking_statement`` on the tracking entry; one transaction.
        Returns the number of lock rows the batches touched."""
        connection = connections[self.db]
        tracking = self._db_key(self.tracking_key(task_key))
        if not self._has_tracking_row(connection, tracking):
            # the task never took a lock (most jobs): nothing to act on, and no write
            # transaction (on SQLite, the one write lock every process of a cluster queues on)
            return 0
        holder = self._encode(task_key)
        count = 0
        with transaction.atomic(using=self.db), connection.cursor() as cursor:
            keys = sorted(
                self._db_key(k) for k in self._tracked_in_tx(connection, cursor, tracking)
            )
            for batch in chunked(keys, self.batch_size):
                cursor.execute(
                    batch_sql(", ".join(["%s"] * len(batch))), batch_params(batch, holder)
                )
                count += cursor.rowcount
            cursor.execute(*tracking_statement(tracking))
        return count
