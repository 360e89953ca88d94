"""``manage.py taskctx_sweep``: fail fanned-out children that never ended, complete their jobs."""

from __future__ import annotations

import importlib

from django.core.management.base import BaseCommand

#: the modules that register each queue's completion of a fanned-out job
COMPLETIONS = (
    "opentelemetry.instrumentation.taskctx._fan_out",
    "opentelemetry.instrumentation.taskctx._tasks_worker",
)


class Command(BaseCommand):
    help = (
        "Fail fanned-out children with no result after OTEL_TASKCTX['FAN_OUT_TIMEOUT'] seconds "
        "(their worker was killed and the queue did not run them again) and complete their "
        "jobs: the job fails with a clear error and its locks are released. Workers sweep by "
        "themselves every 10 s while jobs end; run this from cron (or a schedule) so a job "
        "never waits for a lost child when nothing else runs."
    )

    def handle(self, *args, **options):
        from opentelemetry.instrumentation.taskctx import _barrier

        for module in COMPLETIONS:
            try:
                importlib.import_module(module)
            except ImportError:  # django.tasks (Django 6) or powercrud missing: not in use
                pass
        failed = _barrier.sweep()
        self.stdout.write(f"{failed} fanned-out child(ren) failed after FAN_OUT_TIMEOUT")
