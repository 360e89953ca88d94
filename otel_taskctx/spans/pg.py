"""PostgreSQL writes of span rows: ``COPY`` for new spans, a server-bound upsert for the rest.

Django's psycopg cursor binds parameters on the client: it parses and quotes a multi-row
``INSERT`` in Python, which costs more than building the rows. Here the writer's own
connection (see :mod:`otel_taskctx.spans.writer`) is used directly:

* finished spans that never had a "running" row (nearly all of them) go in with one
  ``COPY ... FROM STDIN`` (psycopg formats the rows in C; PostgreSQL inserts them as a set);
  if any of them is in the table already (``UniqueViolation``: the COPY inserted nothing) the
  batch falls back to the upsert;
* running rows (``ON CONFLICT DO NOTHING``) and finished spans that completed a running row
  (``DO UPDATE``) use one prepared single-row ``INSERT ... ON CONFLICT`` sent as a pipelined
  ``executemany``.

The connection is in autocommit mode: each statement commits on its own (with
``synchronous_commit`` off for this session, set by the writer).
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any


@cache
def _statements() -> tuple[list[str], frozenset[str], str, str, str]:
    """(field names, JSON field names, COPY, upsert-update, insert-if-absent) for the table."""
    from otel_taskctx.span_models import TaskSpan

    fields = [f for f in TaskSpan._meta.concrete_fields if not f.primary_key]
    names = [f.name for f in fields]
    json_names = frozenset(f.name for f in fields if f.get_internal_type() == "JSONField")
    table = f'"{TaskSpan._meta.db_table}"'
    columns = ", ".join(f'"{f.column}"' for f in fields)
    placeholders = ", ".join("%s::jsonb" if f.name in json_names else "%s" for f in fields)
    insert = (
        f"INSERT INTO {table} ({columns}) VALUES ({placeholders}) ON CONFLICT (trace_id, span_id)"
    )
    sets = ", ".join(
        f'"{f.column}" = EXCLUDED."{f.column}"'
        for f in fields
        if f.column not in ("trace_id", "span_id")
    )
    return (
        names,
        json_names,
        f"COPY {table} ({columns}) FROM STDIN",
        f"{insert} DO UPDATE SET {sets}",
        f"{insert} DO NOTHING",
    )


@cache
def _defaults() -> dict[str, Any]:
    from otel_taskctx.span_models import TaskSpan

    return {f.name: f.get_default() for f in TaskSpan._meta.concrete_fields if not f.primary_key}


def _values(rows: list[dict[str, Any]]) -> list[list[Any]]:
    names, json_names, *_ = _statements()
    defaults = _defaults()
    out = []
    for row in rows:
        values = []
        for name in names:
            value = row.get(name, defaults[name])
            if name in json_names:
                value = json.dumps(value)
            values.append(value)
        out.append(values)
    return out


def copy_new(raw: Any, rows: list[dict[str, Any]]) -> bool:
    """``COPY`` ``rows`` into the table. False (nothing written) if one of them is there."""
    import psycopg

    _, _, copy_sql, _, _ = _statements()
    try:
        with psycopg.Cursor(raw) as cursor, cursor.copy(copy_sql) as copy:
            for values in _values(rows):
                copy.write_row(values)
    except psycopg.errors.UniqueViolation:
        return False
    return True


def upsert(raw: Any, rows: list[dict[str, Any]], update: bool) -> None:
    """Insert ``rows``; on a conflict replace the row (``update``) or keep it."""
    import psycopg

    _, _, _, update_sql, insert_sql = _statements()
    with psycopg.Cursor(raw) as cursor:
        cursor.executemany(update_sql if update else insert_sql, _values(rows))
