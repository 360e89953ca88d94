"""``SpanStoreRouter``: the span table in a database of its own, ``OTEL_TASKCTX["SPAN_DATABASE"]``
(on SQLite, the span writes then stop queueing behind the jobs' own; see docs/viewer.md)."""

from __future__ import annotations

from typing import Any


class SpanStoreRouter:
    """Reads, writes and migrations of the span table go to ``SPAN_DATABASE`` (no opinion on
    anything else, nor when the setting is unset)."""

    def _route(self, app_label: str, model_name: str | None) -> str | None:
        from otel_taskctx.conf import get_setting

        if (app_label, model_name) != ("otel_taskctx", "taskspan"):
            return None
        return get_setting("SPAN_DATABASE") or None

    def db_for_read(self, model: Any, **hints: Any) -> str | None:
        return self._route(model._meta.app_label, model._meta.model_name)

    db_for_write = db_for_read

    def allow_migrate(self, db: str, app_label: str, model_name: Any = None, **hints: Any) -> Any:
        alias = self._route(app_label, model_name)
        return None if alias is None else db == alias
