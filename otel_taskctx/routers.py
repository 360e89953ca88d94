"""``SpanStoreRouter``: the span store in a database of its own.

Every job's spans are written by several processes (each worker, the monitor, the process
that enqueues) a few times a second. On SQLite a database has one writer at a time, so in
the jobs' own file those writes queue behind (and delay) django-q2's ORM broker, its result
rows and the jobs' transactions. A second SQLite file takes them out of the way::

    DATABASES = {
        "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": BASE_DIR / "db.sqlite3"},
        "spans": {"ENGINE": "django.db.backends.sqlite3", "NAME": BASE_DIR / "spans.sqlite3"},
    }
    DATABASE_ROUTERS = ["otel_taskctx.routers.SpanStoreRouter"]
    OTEL_TASKCTX = {"SPAN_DATABASE": "spans"}

then ``manage.py migrate --database spans`` creates the span table there. On PostgreSQL the
span writes already run on a connection of their own; a separate database is not needed.
"""

from __future__ import annotations

from typing import Any

SPAN_MODEL = ("otel_taskctx", "taskspan")


def span_database() -> str | None:
    from otel_taskctx.conf import get_setting

    return get_setting("SPAN_DATABASE") or None


class SpanStoreRouter:
    """Reads, writes and migrations of the span table go to ``OTEL_TASKCTX["SPAN_DATABASE"]``
    (no opinion on anything else, nor when the setting is unset)."""

    def _route(self, model: Any) -> str | None:
        meta = model._meta
        if (meta.app_label, meta.model_name) == SPAN_MODEL:
            return span_database()
        return None

    def db_for_read(self, model: Any, **hints: Any) -> str | None:
        return self._route(model)

    def db_for_write(self, model: Any, **hints: Any) -> str | None:
        return self._route(model)

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> bool | None:
        return None

    def allow_migrate(
        self, db: str, app_label: str, model_name: str | None = None, **hints: Any
    ) -> bool | None:
        alias = span_database()
        if alias is None or (app_label, model_name) != SPAN_MODEL:
            return None
        return db == alias
