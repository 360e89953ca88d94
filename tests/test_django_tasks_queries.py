"""What the ``django.tasks`` instrumentation costs in queries, counted on the real worker loop
(django-tasks-db's ``db_worker``, run in this process) with the instrumentation on and off.

A task that fans out nothing asks the fan-out barrier nothing and sweeps nothing: its only
added statements are its carrier's, beside the task (written in the enqueue's transaction,
read when it starts; ended tasks' carriers are deleted in batches, see
``test_ended_tasks_carriers_are_deleted_in_batches``).
"""

from __future__ import annotations

import pytest
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from opentelemetry.instrumentation.taskctx import utils

from tests.testapp import django_tasks as jobs

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True)]
TRANSACTION = {"BEGIN", "COMMIT", "SAVEPOINT", "RELEASE"}


def _enqueue_and_run(tmp_path, label: str) -> tuple[list[str], list[str]]:
    """SQL of one enqueue and of one worker run of it."""
    with CaptureQueriesContext(connection) as enqueued:
        jobs.observe.enqueue(label, str(tmp_path))
    with CaptureQueriesContext(connection) as worked:
        call_command("db_worker", "--batch", "--no-startup-delay", "--interval", "0", "--no-reload")
    return [q["sql"] for q in enqueued.captured_queries], [
        q["sql"] for q in worked.captured_queries
    ]


def _ours(sql: list[str]) -> list[str]:
    return [s for s in sql if "otel_taskctx" in s]


def test_a_task_that_fans_out_nothing_adds_only_its_carriers_statements(tmp_path):
    assert utils.STATE.active
    enqueue_on, run_on = _enqueue_and_run(tmp_path, "on")
    utils.STATE.active = False
    try:
        enqueue_off, run_off = _enqueue_and_run(tmp_path, "off")
    finally:
        utils.STATE.active = True

    assert not any("otel_taskctx_fan_out" in s for s in enqueue_on + run_on)  # no barrier
    assert [s.split()[0] for s in _ours(enqueue_on)] == ["INSERT"]
    assert [s.split()[0] for s in _ours(run_on)] == ["SELECT"], _ours(run_on)  # deleted later
    # the task's row and its carrier commit together (one transaction, a savepoint around
    # the carrier so that a failure to write it never fails the enqueue)
    assert [s.split()[0] for s in enqueue_on if s.split()[0] in TRANSACTION] == [
        "BEGIN",
        "SAVEPOINT",
        "RELEASE",
        "COMMIT",
    ]
    # everything else is what the enqueue and the worker do anyway
    assert _work(enqueue_on) == _work(enqueue_off) + 1
    assert _work(run_on) == _work(run_off) + 1


def _work(sql: list[str]) -> int:
    """Statements that are not transaction control."""
    return len([s for s in sql if s.split()[0] not in TRANSACTION])


def test_ended_tasks_carriers_are_deleted_in_batches(tmp_path):
    from opentelemetry.instrumentation.taskctx import tasks_carriers

    from otel_taskctx.models import TaskCarrier

    tasks_carriers.flush_dropped()
    results = [jobs.observe.enqueue(f"b{n}", str(tmp_path)) for n in range(3)]
    with CaptureQueriesContext(connection) as worked:
        call_command("db_worker", "--batch", "--no-startup-delay", "--interval", "0", "--no-reload")
    assert not [q for q in worked.captured_queries if q["sql"].startswith("DELETE")]
    assert TaskCarrier.objects.count() == 3  # not yet: one delete per batch
    with CaptureQueriesContext(connection) as flushed:
        tasks_carriers.flush_dropped()  # the batch is full, or the process exits
    assert [q["sql"].split()[0] for q in flushed.captured_queries if "otel" in q["sql"]] == [
        "DELETE"
    ]
    assert not TaskCarrier.objects.filter(result_id__in=[str(r.id) for r in results]).exists()
