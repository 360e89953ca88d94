"""``manage.py taskctx_prune``: delete stored spans older than the retention period."""

from __future__ import annotations

from django.core.management.base import BaseCommand

from otel_taskctx.spans.retention import (
    SCHEDULE_NAME,
    ensure_prune_schedule,
    prune_spans,
    remove_prune_schedule,
)


class Command(BaseCommand):
    help = (
        "Delete stored spans older than OTEL_TASKCTX['SPAN_RETENTION_DAYS'] (or --days). "
        "--schedule installs a django-q2 schedule that does it every day."
    )

    def add_arguments(self, parser):
        parser.add_argument("--days", type=float, default=None, help="retention in days")
        parser.add_argument("--dry-run", action="store_true", help="only count")
        parser.add_argument(
            "--schedule", action="store_true", help="create/update a daily django-q2 schedule"
        )
        parser.add_argument(
            "--unschedule", action="store_true", help="remove the django-q2 schedule"
        )
        parser.add_argument("--every-hours", type=int, default=24, help="schedule interval")

    def handle(self, *args, **options):
        if options["unschedule"]:
            removed = remove_prune_schedule()
            self.stdout.write(f"removed {removed} schedule(s) named {SCHEDULE_NAME!r}")
            return
        if options["schedule"]:
            _, created = ensure_prune_schedule(options["every_hours"])
            verb = "created" if created else "updated"
            self.stdout.write(
                f"{verb} django-q2 schedule {SCHEDULE_NAME!r} (every {options['every_hours']}h)"
            )
            return
        count = prune_spans(options["days"], dry_run=options["dry_run"])
        if options["dry_run"]:
            self.stdout.write(f"{count} span(s) would be deleted")
        else:
            self.stdout.write(f"deleted {count} span(s)")
