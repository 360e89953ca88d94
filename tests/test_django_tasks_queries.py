"""What the ``django.tasks`` instrumentation costs in queries, counted on the real worker loop
(django-tasks-db's ``db_worker``, run in this process) with the instrumentation on and off.

A root task that fans out nothing and locks nothing costs no statement at all: its identity is
derived from its result id in the worker, nothing is written beside it, the fan-out barrier
and the lock store are not asked. Carriers (a fanned-out child's, or a root's trace context
with ``DJANGO_TASKS_TRACE_CONTEXT``) are written in the enqueue's transaction and deleted in
batches.
"""

from __future__ import annotations

import pytest
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext, override_settings
from opentelemetry.instrumentation.taskctx import tasks_carriers, tracing

from otel_taskctx.models import TaskCarrier
from tests.testapp import django_tasks as jobs

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True)]
TRACE_CONTEXT = {"OTEL_TASKCTX": {"DJANGO_TASKS_TRACE_CONTEXT": True}}


def _run_worker() -> None:
    call_command("db_worker", "--batch", "--no-startup-delay", "--interval", "0", "--no-reload")


def _enqueue_and_run(tmp_path, label: str) -> tuple[list[str], list[str]]:
    """SQL of one enqueue and of one worker run of it."""
    with CaptureQueriesContext(connection) as enqueued:
        jobs.observe.enqueue(label, str(tmp_path))
    with CaptureQueriesContext(connection) as worked:
        _run_worker()
    return [q["sql"] for q in enqueued.captured_queries], [
        q["sql"] for q in worked.captured_queries
    ]


def _shape(sql: list[str]) -> list[str]:
    """The statements' kinds and tables (their values differ from task to task)."""
    return [" ".join(s.split()[:4]) for s in sql]


def test_a_root_task_costs_no_statement_at_all(tmp_path):
    assert tracing.STATE.active
    enqueue_on, run_on = _enqueue_and_run(tmp_path, "on")
    tracing.STATE.active = False
    try:
        enqueue_off, run_off = _enqueue_and_run(tmp_path, "off")
    finally:
        tracing.STATE.active = True
    assert not [s for s in enqueue_on + run_on if "otel_taskctx" in s]
    assert _shape(enqueue_on) == _shape(enqueue_off)
    assert _shape(run_on) == _shape(run_off)


def test_carriers_commit_with_their_task_and_go_in_batches(tmp_path):
    tasks_carriers.flush_dropped()
    with override_settings(**TRACE_CONTEXT):
        with CaptureQueriesContext(connection) as enqueued:
            first = jobs.observe.enqueue("b0", str(tmp_path))
        results = [first] + [jobs.observe.enqueue(f"b{n}", str(tmp_path)) for n in (1, 2)]
        # the task's row and its carrier commit together (a savepoint around the carrier, so
        # that a failure to write it never fails the enqueue)
        kinds = [q["sql"].split()[0] for q in enqueued.captured_queries]
        assert kinds == ["BEGIN", "INSERT", "SAVEPOINT", "INSERT", "RELEASE", "COMMIT"]
        with CaptureQueriesContext(connection) as worked:
            _run_worker()
    ours = [q["sql"].split()[0] for q in worked.captured_queries if "otel_taskctx" in q["sql"]]
    assert ours == ["SELECT"] * 3  # each task reads its carrier; none is deleted yet
    assert TaskCarrier.objects.count() == 3
    with CaptureQueriesContext(connection) as flushed:
        tasks_carriers.flush_dropped()  # the batch is full, or the process exits
    assert [q["sql"].split()[0] for q in flushed.captured_queries if "otel" in q["sql"]] == [
        "DELETE"
    ]
    assert not TaskCarrier.objects.filter(result_id__in=[str(r.id) for r in results]).exists()
