"""``manage.py nested_job``: run the parent job on this project's queue and check that its
nested launches ran inline under its task key. Exits non-zero on any difference."""

import subprocess
import sys

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from shop.models import Record


def _run_django_q():
    from django_q.models import Task

    if settings.QUEUE == "powercrud":
        from powercrud.async_manager import AsyncManager

        # powercrud passes its own sync=False to django-q2 unless told otherwise
        key = AsyncManager().launch_async_task("shop.jobs.parent", sync=True)
    else:
        from django_q.tasks import async_task

        async_task("shop.jobs.parent")
        key = "wheel-job"
    tasks = list(Task.objects.all())
    _check(len(tasks) == 1, f"one django-q2 Task expected (no nested job queued): {tasks}")
    _check(tasks[0].success, f"the job failed: {tasks[0].result}")
    return key, tasks[0].result


def _run_django_tasks():
    from django_tasks_db.models import DBTaskResult

    from shop.dtasks import parent_task

    result = parent_task.enqueue()
    worker = [sys.executable, "manage.py", "db_worker", "--batch", "--no-startup-delay"]
    subprocess.run([*worker, "--no-reload"], check=True, timeout=120)
    stored = DBTaskResult.objects.get(id=result.id)
    _check(stored.status == "SUCCESSFUL", f"the task failed: {stored.traceback}")
    _check(DBTaskResult.objects.count() == 1, "a nested task reached the queue")
    return Record.objects.get(label="parent").task_key, stored.return_value


def _run_celery():
    from shop.ctasks import parent_task

    result = parent_task.delay()
    worker = [sys.executable, "-m", "celery", "-A", "shop.celery_app", "-q", "worker", "-P", "solo"]
    options = ["--without-mingle", "--without-gossip", "--without-heartbeat", "-l", "WARNING"]
    process = subprocess.Popen([*worker, *options, "-Q", settings.CELERY_TASK_DEFAULT_QUEUE])
    try:
        ids = result.get(timeout=120)
    finally:
        process.terminate()  # a warm shutdown: the task is done
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    _check(result.successful(), f"the job failed: {result.traceback}")
    return f"celery-{result.id}", ids


def _check(condition, message):
    if not condition:
        raise CommandError(message)


class Command(BaseCommand):
    help = "Run a job with nested launches and check they ran under the job's key."

    def handle(self, *args, **options):
        Record.objects.all().delete()
        runners = {"tasks": _run_django_tasks, "celery": _run_celery}
        runner = runners.get(settings.QUEUE, _run_django_q)
        key, ids = runner()
        records = {r.label: r for r in Record.objects.all()}
        _check(set(records) == {"parent", "nested", "nested-in-pool"}, f"steps: {sorted(records)}")
        _check(
            key and records["parent"].task_key == key,
            f"parent ran as {records['parent'].task_key!r}",
        )
        for label in ("nested", "nested-in-pool"):
            record = records[label]
            _check(
                (record.task_key, record.depth) == (key, 1),
                f"{label} ran as {record.task_key!r} depth {record.depth}, not under {key!r}",
            )
            if settings.QUEUE != "django-q2":
                _check(record.lock_holder == key, f"{label}'s lock held by {record.lock_holder!r}")
        _check(records["nested-in-pool"].thread != records["nested"].thread, "no pool thread")
        if settings.QUEUE != "celery":  # (Celery's inline launches return an EagerResult)
            _check(all(i.startswith(f"{key}/nested/") for i in ids), f"launch ids: {ids}")
        self.stdout.write(f"{settings.QUEUE}: nested launches ran inline under {key}")
