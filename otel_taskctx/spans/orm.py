"""Writes of span rows on databases other than SQLite and PostgreSQL: the ORM's portable (and
slower) upsert."""

from __future__ import annotations

from typing import Any

from otel_taskctx.spans.table import SPAN_KEY


def write(alias: str, finished: list[dict[str, Any]], running: list[dict[str, Any]]) -> None:
    """Databases other than SQLite and PostgreSQL: the ORM's (slower) portable upsert."""
    from django.db import transaction

    from otel_taskctx.models import TaskSpan

    with transaction.atomic(using=alias):
        if running:
            TaskSpan.objects.using(alias).bulk_create(
                [TaskSpan(**row) for row in running], ignore_conflicts=True
            )
        if finished:
            fields = [k for k in finished[0] if k not in SPAN_KEY]
            TaskSpan.objects.using(alias).bulk_create(
                [TaskSpan(**row) for row in finished],
                update_conflicts=True,
                unique_fields=list(SPAN_KEY),
                update_fields=fields,
            )
