"""The task identity reaches threads started inside a job (opentelemetry-instrumentation-threading,
enabled with our instrumentor): a real qcluster and a real db_worker run jobs whose threads make
nested launches; each runs inline under the job's key."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from django_q.models import Task
from django_tasks_db.models import DBTaskResult
from opentelemetry.instrumentation.taskctx import TaskContextInstrumentor, threads
from opentelemetry.instrumentation.threading import ThreadingInstrumentor
from powercrud.async_manager import AsyncManager

from otel_taskctx import current_task, task_context
from otel_taskctx.context import start_detached
from tests.test_django_tasks import db_worker, seen
from tests.testapp.models import Invoice, InvoiceLine, Observation
from tests.testapp.threads import LINE, publish_from_threads

QUIET = {"OTEL_TASKCTX": {"SPAN_STORE": False}}


def _in_thread_and_pool() -> tuple[object, object]:
    """The task key a plain thread and a pool thread see."""
    found: dict[str, object] = {}

    def look() -> None:
        found["thread"] = getattr(current_task(), "task_key", None)

    thread = threading.Thread(target=look)
    thread.start()
    thread.join()
    with ThreadPoolExecutor(1) as pool:
        in_pool = pool.submit(lambda: getattr(current_task(), "task_key", None)).result()
    return found["thread"], in_pool


def _restore(instrumentor: TaskContextInstrumentor) -> None:
    if (
        ThreadingInstrumentor().is_instrumented_by_opentelemetry
        and not threads.instrumented_by_us()
    ):
        ThreadingInstrumentor().uninstrument()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument()
    assert threads.instrumented_by_us()


def test_the_app_carries_the_task_into_threads_and_uninstrument_takes_it_back():
    instrumentor = TaskContextInstrumentor()
    assert threads.instrumented_by_us()
    with task_context("job-t"):
        assert _in_thread_and_pool() == ("job-t", "job-t")
    try:
        instrumentor.uninstrument()
        assert not ThreadingInstrumentor().is_instrumented_by_opentelemetry
        with task_context("job-t"):
            assert _in_thread_and_pool() == (None, None)
    finally:
        _restore(instrumentor)


def test_the_librarys_own_threads_start_outside_the_job():
    """A long-lived thread of ours started lazily inside a job must not run as that job."""
    found = {}

    def look(name: str) -> None:
        found[name] = getattr(current_task(), "task_key", None)

    with task_context("job-own"):
        plain = threading.Thread(target=look, args=("plain",))
        plain.start()
        plain.join()
        start_detached(threading.Thread(target=look, args=("ours",))).join()
        assert current_task().task_key == "job-own"  # the caller's context is back
    assert found == {"plain": "job-own", "ours": None}


def test_a_hosts_threading_instrumentation_stays_the_hosts():
    instrumentor = TaskContextInstrumentor()
    try:
        instrumentor.uninstrument()
        ThreadingInstrumentor().instrument()  # the host's own, before ours
        instrumentor.instrument()
        assert not threads.instrumented_by_us()
        instrumentor.uninstrument()
        assert ThreadingInstrumentor().is_instrumented_by_opentelemetry  # still the host's
        with task_context("job-h"):
            assert _in_thread_and_pool() == ("job-h", "job-h")
    finally:
        _restore(instrumentor)


def test_threading_disabled_by_the_host_stays_off(monkeypatch):
    instrumentor = TaskContextInstrumentor()
    try:
        instrumentor.uninstrument()
        monkeypatch.setenv("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", "django, threading")
        instrumentor.instrument()
        assert instrumentor.is_instrumented_by_opentelemetry
        assert not ThreadingInstrumentor().is_instrumented_by_opentelemetry
        with task_context("job-d"):
            assert _in_thread_and_pool() == (None, None)
        instrumentor.uninstrument()
    finally:
        monkeypatch.delenv("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS")
        _restore(instrumentor)


@pytest.mark.cluster
@pytest.mark.stack
@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("export_spans_after_test")
def test_nested_launches_from_a_jobs_threads_run_inline_under_its_key(cluster_factory, cache):
    cluster = cluster_factory(settings=QUIET)
    invoice = Invoice.objects.create(number="INV-T")
    InvoiceLine.objects.bulk_create(InvoiceLine(invoice=invoice) for _ in range(2))
    line_ids = sorted(InvoiceLine.objects.values_list("pk", flat=True))
    manager = AsyncManager()
    key = manager.launch_async_task("tests.testapp.threads.launch_from_threads", line_ids)
    task = cluster.wait_for(
        lambda: Task.objects.filter(name=key).first(), timeout=30, what=f"task {key}"
    )
    assert task.success, task.result

    steps = {o.value["label"]: o.value for o in Observation.objects.filter(kind="thread_step")}
    (launched,) = Observation.objects.filter(kind="launched")
    assert set(steps) == {"pool", "pool-async", "thread"}
    for step in steps.values():
        # inline, under the job's key, one level deeper, in a thread other than the job's
        assert (step["task_key"], step["depth"]) == (key, 1)
        assert step["thread"] != launched.value["thread"]
    assert steps["thread"]["thread"] == "job-thread"
    # launch_async_task passed the job's key and locked the step's line under it
    assert steps["pool"]["task_key_kwarg"] == steps["thread"]["task_key_kwarg"] == key
    assert steps["pool"]["lock_holder"] == steps["thread"]["lock_holder"] == key
    assert all(i.startswith(f"{key}/nested/") for i in launched.value["ids"])
    # nothing reached the broker: the job is the only Task; its hook released the lines
    assert list(Task.objects.values_list("name", flat=True)) == [key]
    cluster.wait_for(
        lambda: not manager.check_conflict({LINE: line_ids}), what="the lines' locks released"
    )


@pytest.mark.stack
@pytest.mark.django_db(transaction=True)
def test_nested_enqueues_from_a_django_task_threads_run_inline_under_its_key(tmp_path):
    result = publish_from_threads.enqueue("th", [201, 202], str(tmp_path))
    db_worker()

    stored = DBTaskResult.objects.get(id=result.id)
    assert stored.status == "SUCCESSFUL", stored.traceback
    key = seen(tmp_path, "th-parent")["task_key"]
    assert key
    for label, child in (("th-pool", 201), ("th-thread", 202)):
        step = seen(tmp_path, label)
        assert (step["task_key"], step["root"], step["depth"]) == (key, key, 1)
        assert step["held"] == {str(child): key}  # locked under the task's key while it ran
    assert all(i.startswith(f"{key}/nested/") for i in stored.return_value)
    assert DBTaskResult.objects.count() == 1  # nothing else reached the queue
