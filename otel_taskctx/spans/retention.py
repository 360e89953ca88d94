"""Retention: deleting stored spans older than ``OTEL_TASKCTX["SPAN_RETENTION_DAYS"]``.

``prune_spans`` is what ``taskctx_prune --schedule``'s django-q2 schedule runs (its dotted path
is stored in the schedule's row).
"""

from __future__ import annotations

import logging
from datetime import timedelta

log = logging.getLogger("otel_taskctx.spans")


def prune_spans(days: float | None = None, batch_size: int = 2000, dry_run: bool = False) -> int:
    """Delete spans that started more than ``days`` days ago (in small batches, so an SQLite
    writer is never blocked for long); returns how many (would) go."""
    from django.utils import timezone

    from otel_taskctx.conf import get_setting
    from otel_taskctx.models import TaskSpan

    days = get_setting("SPAN_RETENTION_DAYS") if days is None else days
    if days is None:
        return 0
    old = TaskSpan.objects.filter(started_at__lt=timezone.now() - timedelta(days=float(days)))
    if dry_run:
        return old.count()
    total = 0
    while ids := list(old.values_list("id", flat=True)[:batch_size]):
        total += TaskSpan.objects.filter(id__in=ids).delete()[0]
    if total:
        log.info("otel_taskctx: pruned %d stored span(s) older than %s days", total, days)
    return total
