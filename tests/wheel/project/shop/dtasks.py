"""The same parent and nested step as ``shop.jobs``, as ``django.tasks`` tasks (Django 6+)."""

from django.tasks import task

from otel_taskctx import register_descendants
from shop import jobs


@task
def step_task(label, item):
    register_descendants(jobs.MODEL, [item])  # locked under the task's key
    return jobs.step(label, item)


@task
def parent_task():
    jobs.step("parent")
    return jobs.in_job_and_pool(lambda label, item: step_task.enqueue(label, item).id)
