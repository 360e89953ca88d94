"""Retention: deleting stored spans older than ``OTEL_TASKCTX["SPAN_RETENTION_DAYS"]``."""

from __future__ import annotations

import logging
from datetime import timedelta

log = logging.getLogger("otel_taskctx.spans")

SCHEDULE_NAME = "otel_taskctx: prune stored spans"
SCHEDULE_FUNC = "otel_taskctx.spans.retention.prune_spans"
BATCH_SIZE = 2000


def prune_spans(
    days: float | None = None, batch_size: int = BATCH_SIZE, dry_run: bool = False
) -> int:
    """Delete spans that started more than ``days`` days ago; returns how many (would) go.

    Deletes in small batches so an SQLite writer is never blocked for long.
    """
    from django.utils import timezone

    from otel_taskctx.conf import get_setting
    from otel_taskctx.models import TaskSpan

    if days is None:
        days = get_setting("SPAN_RETENTION_DAYS")
    if days is None:
        return 0
    cutoff = timezone.now() - timedelta(days=float(days))
    old = TaskSpan.objects.filter(started_at__lt=cutoff)
    if dry_run:
        return old.count()
    total = 0
    while True:
        ids = list(old.values_list("id", flat=True)[:batch_size])
        if not ids:
            break
        deleted, _ = TaskSpan.objects.filter(id__in=ids).delete()
        total += deleted
    if total:
        log.info("otel_taskctx: pruned %d stored span(s) older than %s days", total, days)
    return total


def ensure_prune_schedule(hours: int = 24) -> tuple[object, bool]:
    """Create (or update) a django-q2 schedule running :func:`prune_spans` every ``hours``."""
    from django_q.models import Schedule

    schedule, created = Schedule.objects.update_or_create(
        name=SCHEDULE_NAME,
        defaults={
            "func": SCHEDULE_FUNC,
            "schedule_type": Schedule.MINUTES,
            "minutes": int(hours * 60),
            "repeats": -1,
        },
    )
    return schedule, created


def remove_prune_schedule() -> int:
    from django_q.models import Schedule

    deleted, _ = Schedule.objects.filter(name=SCHEDULE_NAME).delete()
    return deleted
