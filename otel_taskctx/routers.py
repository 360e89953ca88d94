"""``SpanStoreRouter``: the span table in a database of its own, ``OTEL_TASKCTX["SPAN_DATABASE"]``
(on SQLite, the span writes then stop queueing behind the jobs' own; see docs/processor.md)."""

from __future__ import annotations

from typing import Any

SPAN_MODEL = ("otel_taskctx", "taskspan")


def span_database() -> str | None:
    from otel_taskctx.conf import get_setting

    return get_setting("SPAN_DATABASE") or None


class SpanStoreRouter:
    """Reads, writes and migrations of the span table go to ``SPAN_DATABASE`` (no opinion on
    anything else, nor when the setting is unset)."""

    def db_for_read(self, model: Any, **hints: Any) -> str | None:
        meta = model._meta
        return span_database() if (meta.app_label, meta.model_name) == SPAN_MODEL else None

    db_for_write = db_for_read

    def allow_migrate(
        self, db: str, app_label: str, model_name: str | None = None, **hints: Any
    ) -> bool | None:
        alias = span_database()
        if alias is None or (app_label, model_name) != SPAN_MODEL:
            return None
        return db == alias
