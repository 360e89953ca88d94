"""SQLite writes of span rows: a raw upsert.

Rows go in with ``INSERT ... ON CONFLICT`` statements of up to :data:`UPSERT_CHUNK` rows, sent
to the ``sqlite3`` cursor directly (see :func:`upsert`). The database and its connections keep
the host's settings: no PRAGMA is sent (the journal mode, ``synchronous`` and the busy timeout
are the project's, e.g. ``DATABASES[...]["OPTIONS"]["init_command"]`` and ``"timeout"``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from otel_taskctx.spans.table import SPAN_KEY, span_database, written_fields

#: rows per INSERT statement of the raw upsert
UPSERT_CHUNK = 500
#: column types whose values the backend adapts (the rest go to SQLite as they are)
_ADAPTED = ("JSONField", "DateTimeField")


def caller_holds_transaction(using: str | None = None) -> bool:
    """True when the calling thread is inside ``atomic()`` on an SQLite span database.

    Waiting for our writer there would wait for the caller's own write lock.
    """
    try:
        from django.db import connections

        connection = connections[span_database(using)]
        return connection.vendor == "sqlite" and connection.in_atomic_block
    except Exception:
        return False


def write(connection: Any, finished: list[dict[str, Any]], running: list[dict[str, Any]]) -> None:
    """Running rows (kept if a row is there) and finished ones (replacing it)."""
    if running and finished:
        from django.db import transaction

        with transaction.atomic(using=connection.alias):
            upsert(connection, running, update=False)
            upsert(connection, finished, update=True)
    else:  # one statement (per chunk): autocommit
        upsert(connection, running or finished, update=bool(finished))


@dataclass(frozen=True)
class _Plan:
    """How rows become the parameters of the upsert (built once per process).

    Columns in the order their values are built: the plain ones straight from the row, then
    ``start_hour`` (always from ``start_ns``), then those the backend adapts (JSON text,
    datetimes).
    """

    table: str
    columns: str
    width: int  # columns per row
    row_placeholders: str
    key: str
    updates: str
    plain: tuple[tuple[str, Any], ...]
    json: tuple[tuple[str, Any], ...]
    datetimes: tuple[str, ...]


@functools.cache
def _plan() -> _Plan:
    from otel_taskctx.models import TaskSpan

    fields = written_fields()
    kinds = {f.name: f.get_internal_type() for f in fields}
    plain = [f for f in fields if f.name != "start_hour" and kinds[f.name] not in _ADAPTED]
    json_fields = [f for f in fields if kinds[f.name] == "JSONField"]
    datetimes = [f for f in fields if kinds[f.name] == "DateTimeField"]
    ordered = [*plain, TaskSpan._meta.get_field("start_hour"), *json_fields, *datetimes]
    if len(ordered) != len(fields):  # a new kind of column: add it to the plan
        raise RuntimeError("the span table has a column the SQLite upsert does not handle")
    return _Plan(
        table=f'"{TaskSpan._meta.db_table}"',
        columns=", ".join(f'"{f.column}"' for f in ordered),
        width=len(ordered),
        row_placeholders="(" + ", ".join(["?"] * len(ordered)) + ")",
        key=", ".join(f'"{name}"' for name in SPAN_KEY),
        updates=", ".join(
            f'"{f.column}" = EXCLUDED."{f.column}"' for f in ordered if f.column not in SPAN_KEY
        ),
        plain=tuple((f.name, f.get_default()) for f in plain),
        json=tuple((f.name, f.get_default()) for f in json_fields),
        datetimes=tuple(f.name for f in datetimes),
    )


def upsert(connection: Any, rows: list[dict[str, Any]], update: bool) -> None:
    """``INSERT ... ON CONFLICT``, a row per span, keyed by its hour and ids.

    ``update``: a finished span replaces whatever row is there; otherwise (a running span)
    the row is only inserted when absent, so it never overwrites a finished one.

    The statement goes to the ``sqlite3`` cursor with ``?`` placeholders: Django's cursor
    would rewrite every ``%s`` of a 500-row statement with a regular expression first. Errors
    still come out as Django's (``OperationalError`` for "database is locked": retried).
    """
    from otel_taskctx.models import hour_of

    plan = _plan()
    action = f"DO UPDATE SET {plan.updates}" if update else "DO NOTHING"
    adapt_json = connection.ops.adapt_json_value
    adapt_datetime = connection.ops.adapt_datetimefield_value
    size = UPSERT_CHUNK
    max_params = getattr(connection.features, "max_query_params", None)
    if max_params:
        size = max(1, min(size, max_params // plan.width))
    with connection.wrap_database_errors:
        cursor = connection.connection.cursor()
        try:
            for start in range(0, len(rows), size):
                chunk = rows[start : start + size]
                params: list[Any] = []
                for row in chunk:
                    params.extend([row.get(name, default) for name, default in plan.plain])
                    params.append(hour_of(row["start_ns"]))
                    for name, default in plan.json:
                        value = row.get(name, default)
                        params.append("[]" if value == [] else adapt_json(value, None))
                    for name in plan.datetimes:
                        params.append(adapt_datetime(row.get(name)))
                values = ", ".join([plan.row_placeholders] * len(chunk))
                cursor.execute(
                    f"INSERT INTO {plan.table} ({plan.columns}) VALUES {values} "
                    f"ON CONFLICT ({plan.key}) {action}",
                    params,
                )
        finally:
            cursor.close()
