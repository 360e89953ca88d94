"""The jobs of the wheel check: a parent job makes two nested launches, one from its own
thread and one from a pool thread; both must run inline under the parent's task key."""

import threading
from concurrent.futures import ThreadPoolExecutor

from django.conf import settings
from django.db import connection

from otel_taskctx import current_task, get_conflict_store, task_context
from otel_taskctx.descendants import resolve_manager
from shop.models import Record

MODEL = "shop.record"


def _holder(identity, item):
    """Who holds ``item``'s lock in the task's conflict store (powercrud's, or the one
    otel-taskctx keeps for django.tasks)."""
    if identity is None or item is None or identity.manager_class_path is None:
        return ""
    store = get_conflict_store(resolve_manager(identity))
    found = store.holders({MODEL: [item]}).get(MODEL, {})
    return found.get(item) or found.get(str(item)) or ""


def step(label, item=None, task_key=None, **kwargs):
    """Write down the task this step runs as and who holds its item's lock."""
    identity = current_task()
    Record.objects.create(
        label=label,
        task_key=identity.task_key if identity else "",
        depth=identity.depth if identity else None,
        thread=threading.current_thread().name,
        lock_holder=_holder(identity, item),
    )
    return label


def in_job_and_pool(launch):
    """``launch("nested", 1)`` here, then ``launch("nested-in-pool", 2)`` on a pool thread."""

    def in_pool():
        try:
            return launch("nested-in-pool", 2)
        finally:
            connection.close()  # the pool thread's own connection

    ids = [launch("nested", 1)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        ids.append(pool.submit(in_pool).result())
    return [str(i) for i in ids]


def _launch(label, item):
    if settings.QUEUE == "powercrud":
        from powercrud.async_manager import AsyncManager

        return AsyncManager().launch_async_task(
            "shop.jobs.step", label, item, conflict_ids={MODEL: {item}}
        )
    from django_q.tasks import async_task

    return async_task("shop.jobs.step", label)


def parent(task_key=None, **kwargs):
    """The parent job. Launched by powercrud it is a task already; a plain django-q2 job
    names itself one."""
    if current_task() is None:
        with task_context("wheel-job"):
            return parent()
    step("parent")
    return in_job_and_pool(_launch)
