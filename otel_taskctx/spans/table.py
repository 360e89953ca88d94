"""The span table as the writer's statements see it: its unique key, the columns a write sets,
a row's value for each, and the database the table is written to."""

from __future__ import annotations

from typing import Any

#: the span table's unique key (``start_hour``: the hour ``start_ns`` falls in)
SPAN_KEY = ("start_hour", "trace_id", "span_id")


def written_fields() -> list[Any]:
    """The span table's fields a write sets: all but the id."""
    from otel_taskctx.models import TaskSpan

    return [f for f in TaskSpan._meta.concrete_fields if not f.primary_key]


def row_value(row: dict[str, Any], name: str, default: Any) -> Any:
    """The value of column ``name`` for ``row``; ``start_hour`` always from ``start_ns``."""
    if name == "start_hour":
        from otel_taskctx.models import hour_of

        return hour_of(row["start_ns"])
    return row.get(name, default)


def span_database(using: str | None = None) -> str:
    """``using``, or the database alias the routers send the span table's writes to."""
    if using:
        return using
    from django.db import router

    from otel_taskctx.models import TaskSpan

    return router.db_for_write(TaskSpan)


def span_target(using: str | None = None) -> Any:
    """The database the span table is written to now, ``(alias, NAME)`` (None without
    settings): read from the settings Django's test runner switches to the test database and
    back, so a row made for a test database is never written once it has gone."""
    try:
        from django.conf import settings

        alias = span_database(using)
        return (alias, settings.DATABASES[alias].get("NAME"))
    except Exception:  # settings not configured: no check
        return None
