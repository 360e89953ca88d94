"""``manage.py taskctx_prune``: delete stored spans older than the retention period."""

from __future__ import annotations

from django.core.management.base import BaseCommand

from otel_taskctx.spans.retention import prune_spans

SCHEDULE_NAME = "otel_taskctx: prune stored spans"


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
        if not (options["schedule"] or options["unschedule"]):
            count = prune_spans(options["days"], dry_run=options["dry_run"])
            dry = options["dry_run"]
            self.stdout.write(
                f"{count} span(s) would be deleted" if dry else f"deleted {count} span(s)"
            )
            return
        from django_q.models import Schedule

        if options["unschedule"]:
            removed, _ = Schedule.objects.filter(name=SCHEDULE_NAME).delete()
            self.stdout.write(f"removed {removed} schedule(s) named {SCHEDULE_NAME!r}")
        else:
            hours = options["every_hours"]
            _, created = Schedule.objects.update_or_create(
                name=SCHEDULE_NAME,
                defaults={
                    "func": f"{prune_spans.__module__}.prune_spans",
                    "schedule_type": Schedule.MINUTES,
                    "minutes": hours * 60,
                    "repeats": -1,
                },
            )
            verb = "created" if created else "updated"
            self.stdout.write(f"{verb} django-q2 schedule {SCHEDULE_NAME!r} (every {hours}h)")
