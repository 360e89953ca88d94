"""PostgreSQL writes of span rows: ``COPY`` for new spans, a server-bound upsert for the rest.

Django's psycopg cursor binds parameters on the client: it parses and quotes a multi-row
``INSERT`` in Python, which costs more than building the rows. Here the writer's own
connection (see :mod:`otel_taskctx.spans.writer`) is used directly (:func:`write`):

* finished spans that never had a "running" row (nearly all of them) go in with one
  ``COPY ... FROM STDIN`` (psycopg formats the rows in C; PostgreSQL inserts them as a set);
  if any of them is in the table already (``UniqueViolation``: the COPY inserted nothing) the
  batch falls back to the upsert;
* running rows (``ON CONFLICT DO NOTHING``) and finished spans that completed a running row
  (``DO UPDATE``) use one prepared single-row ``INSERT ... ON CONFLICT`` sent as a pipelined
  ``executemany``.

The connection is in autocommit mode: each statement commits on its own. The session keeps
the host's settings (nothing is ``SET``: with Django's connection pool a session setting would
outlive the writer's use of the connection).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from typing import Any

from otel_taskctx.spans.table import SPAN_KEY, row_value, written_fields

#: running rows remembered (to complete them with an upsert rather than a COPY)
MAX_TRACKED_RUNNING_ROWS = 100_000


def write(
    raw: Any,
    finished: list[dict[str, Any]],
    running: list[dict[str, Any]],
    running_rows: set[tuple[str, str]],
) -> None:
    """Write a batch on the writer's psycopg connection ``raw``.

    ``running_rows``: the writer's ``(trace_id, span_id)`` of the running rows it wrote,
    updated here. A finished span among them completes its row with the upsert; the others go
    in with one ``COPY``.
    """
    if running:
        upsert(raw, running, update=False)
        if len(running_rows) > MAX_TRACKED_RUNNING_ROWS:
            running_rows.clear()  # only a shortcut: the COPY fallback stays correct
        running_rows.update((row["trace_id"], row["span_id"]) for row in running)
    if not finished:
        return
    completing = [r for r in finished if (r["trace_id"], r["span_id"]) in running_rows]
    new = [r for r in finished if (r["trace_id"], r["span_id"]) not in running_rows]
    if new and not copy_new(raw, new):
        completing += new  # some were in the table already: upsert them all
    if completing:
        upsert(raw, completing, update=True)
        for row in completing:
            running_rows.discard((row["trace_id"], row["span_id"]))


@dataclass(frozen=True)
class _Table:
    names: list[str]  # the columns' field names, in order
    json_names: frozenset[str]
    defaults: dict[str, Any]
    copy: str  # COPY ... FROM STDIN
    upsert: str  # single-row INSERT ... ON CONFLICT DO UPDATE
    insert_if_absent: str  # single-row INSERT ... ON CONFLICT DO NOTHING


@cache
def _table() -> _Table:
    from otel_taskctx.models import TaskSpan

    fields = written_fields()
    json_names = frozenset(f.name for f in fields if f.get_internal_type() == "JSONField")
    table = f'"{TaskSpan._meta.db_table}"'
    columns = ", ".join(f'"{f.column}"' for f in fields)
    placeholders = ", ".join("%s::jsonb" if f.name in json_names else "%s" for f in fields)
    insert = (
        f"INSERT INTO {table} ({columns}) VALUES ({placeholders}) "
        f"ON CONFLICT ({', '.join(SPAN_KEY)})"
    )
    sets = ", ".join(
        f'"{f.column}" = EXCLUDED."{f.column}"' for f in fields if f.column not in SPAN_KEY
    )
    return _Table(
        names=[f.name for f in fields],
        json_names=json_names,
        defaults={f.name: f.get_default() for f in fields},
        copy=f"COPY {table} ({columns}) FROM STDIN",
        upsert=f"{insert} DO UPDATE SET {sets}",
        insert_if_absent=f"{insert} DO NOTHING",
    )


def _values(rows: list[dict[str, Any]]) -> list[list[Any]]:
    table = _table()
    out = []
    for row in rows:
        values = []
        for name in table.names:
            value = row_value(row, name, table.defaults[name])
            if name in table.json_names:
                value = json.dumps(value)
            values.append(value)
        out.append(values)
    return out


def copy_new(raw: Any, rows: list[dict[str, Any]]) -> bool:
    """``COPY`` ``rows`` into the table. False (nothing written) if one of them is there."""
    import psycopg

    try:
        with psycopg.Cursor(raw) as cursor, cursor.copy(_table().copy) as copy:
            for values in _values(rows):
                copy.write_row(values)
    except psycopg.errors.UniqueViolation:
        return False
    return True


def upsert(raw: Any, rows: list[dict[str, Any]], update: bool) -> None:
    """Insert ``rows``; on a conflict replace the row (``update``) or keep it."""
    import psycopg

    table = _table()
    with psycopg.Cursor(raw) as cursor:
        cursor.executemany(table.upsert if update else table.insert_if_absent, _values(rows))
