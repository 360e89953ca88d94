"""A view that behaves like a model save(): asks for the task, locks, launches a nested job."""

from django.http import JsonResponse
from django_q.models import OrmQ
from django_q.tasks import async_task

from otel_taskctx import current_task, register_descendants, skip_nested_async


def nested_probe(request):
    before = OrmQ.objects.count()
    identity = current_task()
    registration = register_descendants("testapp.Child", [1, 2, 3])
    job_id = async_task("math.floor", 1.5)
    return JsonResponse(
        {
            "task": identity.task_key if identity else None,
            "skip": skip_nested_async(),
            "registered": bool(registration),
            "job_id": job_id,
            "enqueued": OrmQ.objects.count() - before,
        }
    )
