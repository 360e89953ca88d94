"""The same parent and nested step as ``shop.jobs``, as Celery tasks."""

from otel_taskctx import register_descendants
from shop import jobs
from shop.celery_app import app


@app.task
def step_task(label, item):
    register_descendants(jobs.MODEL, [item])  # locked under the job's key
    return jobs.step(label, item)


@app.task
def parent_task():
    jobs.step("parent")
    return jobs.in_job_and_pool(lambda label, item: step_task.delay(label, item).id)
