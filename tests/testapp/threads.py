"""Jobs that hand work to threads (tests/test_threads.py): a ``ThreadPoolExecutor`` and a
``threading.Thread`` started inside the job each make a nested launch, which must run inline
under the job's key like one made by the job itself."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from django.db import connection
from django.tasks import task

LINE = "testapp.invoiceline"


def _in_pool_and_thread(pool_work: list[Callable[[], Any]], thread_work: Callable[[], Any]):
    """Run each of ``pool_work`` on a thread pool and ``thread_work`` on a plain thread;
    return their results (or re-raise their errors) once all have finished."""

    def closing(work: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            try:
                return work()
            finally:
                connection.close()  # the thread's own database connection

        return run

    with ThreadPoolExecutor(max_workers=len(pool_work)) as pool:
        futures = [pool.submit(closing(work)) for work in pool_work]
        outcome: dict[str, Any] = {}

        def in_thread() -> None:
            try:
                outcome["value"] = closing(thread_work)()
            except BaseException as exc:  # handed to the job below
                outcome["error"] = exc

        thread = threading.Thread(target=in_thread, name="job-thread")
        thread.start()
        thread.join()
        results = [future.result() for future in futures]
    if "error" in outcome:
        raise outcome["error"]
    return [*results, outcome["value"]]


def record_step(label: str, line_id: int | None = None, task_key: str | None = None, **kwargs):
    """The nested step: writes down the task it runs as, its thread and who holds its line."""
    from powercrud.async_manager import AsyncManager

    from otel_taskctx import current_task
    from tests.testapp.models import Observation

    identity = current_task()
    holder = ""
    if line_id is not None:
        manager = AsyncManager()
        holder = manager.cache.get(f"{manager.conflict_model_prefix}{LINE}:{line_id}") or ""
    Observation.record(
        "thread_step",
        {
            "label": label,
            "task_key": identity.task_key if identity else None,
            "depth": identity.depth if identity else None,
            "task_key_kwarg": task_key,
            "thread": threading.current_thread().name,
            "lock_holder": holder,
        },
        task_key=task_key or "",
    )
    return label


def launch_from_threads(line_ids: list[int], task_key: str | None = None, **kwargs) -> list[str]:
    """A django-q2 job: from a pool thread, ``launch_async_task`` (locking ``line_ids[0]``) and
    ``async_task``; from a plain thread, ``launch_async_task`` (locking ``line_ids[1]``)."""
    from django_q.tasks import async_task
    from powercrud.async_manager import AsyncManager

    from tests.testapp.models import Observation

    step = "tests.testapp.threads.record_step"

    def launch(label: str, line_id: int) -> Callable[[], str]:
        return lambda: AsyncManager().launch_async_task(
            step, label, line_id, conflict_ids={LINE: {line_id}}
        )

    ids = _in_pool_and_thread(
        [launch("pool", line_ids[0]), lambda: async_task(step, "pool-async")],
        launch("thread", line_ids[1]),
    )
    Observation.record("launched", {"ids": ids, "thread": threading.current_thread().name})
    return ids


@task
def publish_from_threads(label: str, child_ids: list[int], marker_dir: str) -> list[str]:
    """A ``django.tasks`` task: a pool thread and a plain thread each ``.enqueue()`` the nested
    ``sync_chapters`` for one child (run inline under this task's key)."""
    from tests.testapp.django_tasks import _seen, _write, sync_chapters

    _write(marker_dir, f"{label}-parent", _seen())

    def enqueue(name: str, child_id: int) -> Callable[[], str]:
        return lambda: str(sync_chapters.enqueue(f"{label}-{name}", [child_id], marker_dir).id)

    return _in_pool_and_thread([enqueue("pool", child_ids[0])], enqueue("thread", child_ids[1]))
