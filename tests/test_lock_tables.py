"""The lock store writes no table that is not ours.

Every INSERT, UPDATE and DELETE of a whole powercrud job cycle (launch with ``conflict_ids``,
descendants registered inside the job, the completion hook's release), captured on every
database connection, touches only otel_taskctx's tables, django-q2's own (its task and queue
rows, written by its own code) and the job's models (``testapp``). Powercrud's locks,
tracking sets, progress and active-task keys are rows of ``otel_taskctx_lock``, never rows of
Django's cache table: neither with Django's own ``DatabaseCache`` as powercrud's cache (the
lock-safe view) nor with ``otel_taskctx.cache.DatabaseCache``.
"""

from __future__ import annotations

import re
import uuid
from contextlib import ExitStack

import pytest
from django.db import connections
from django.test.utils import CaptureQueriesContext
from django_q.models import Task
from powercrud.async_manager import AsyncManager

from otel_taskctx import register_descendants
from tests.conflict_caches import use_locks_cache, wipe

pytestmark = [
    pytest.mark.stack,
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("export_spans_after_test"),
]
CHILD = "testapp.child"
#: the table a write statement writes
WRITE = re.compile(
    r'^\s*(?:INSERT\s+(?:OR\s+\w+\s+)?INTO|UPDATE|DELETE\s+FROM)\s+"?([\w.]+)"?', re.IGNORECASE
)
OURS_OR_THEIR_OWN = ("otel_taskctx_", "django_q_", "testapp_")


def register_in_job(ids: list[int], task_key: str | None = None) -> list[int]:
    """The job: registers descendants under its task key (run by django-q2 ``sync``)."""
    registration = register_descendants(CHILD, ids)
    assert registration, registration
    return sorted(registration.reserved)


@pytest.mark.parametrize("kind", ["plain-db", "db"])
def test_a_job_cycle_writes_only_tables_of_ours(kind):
    with use_locks_cache(kind, f"tables-{uuid.uuid4().hex[:8]}"):
        wipe(kind)
        manager = AsyncManager()
        with ExitStack() as stack:
            captured = [
                stack.enter_context(CaptureQueriesContext(connection))
                for connection in connections.all()
            ]
            key = manager.launch_async_task(
                "tests.test_lock_tables.register_in_job",
                [4, 5, 6],
                conflict_ids={CHILD: {1, 2, 3}},
                sync=True,
            )
        task = Task.objects.get(name=key)
        assert task.success and task.result == [4, 5, 6]
        assert manager.check_conflict({CHILD: range(1, 7)}) == set()  # released by the hook
        writes = [
            (match.group(1), query["sql"])
            for capture in captured
            for query in capture.captured_queries
            if (match := WRITE.match(query["sql"]))
        ]
        tables = {table for table, _ in writes}
        strangers = [(t, sql) for t, sql in writes if not t.startswith(OURS_OR_THEIR_OWN)]
        assert strangers == [], strangers
        assert "otel_taskctx_lock" in tables  # the locks were written, and here
        wipe(kind)
