"""``manage.py taskctx_sweep``: fail fanned-out children that never ended, complete their jobs."""

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = (
        "Fail fanned-out children with no result after OTEL_TASKCTX['FAN_OUT_TIMEOUT'] seconds "
        "(their worker was killed and the queue did not run them again) and complete their "
        "jobs: the job fails with a clear error and its locks are released. Workers sweep by "
        "themselves while children are pending; run this from cron for when nothing else runs."
    )

    def handle(self, *args, **options):
        from opentelemetry.instrumentation.taskctx import barrier

        failed = barrier.sweep()
        self.stdout.write(f"{failed} fanned-out child(ren) failed after FAN_OUT_TIMEOUT")
