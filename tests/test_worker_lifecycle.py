"""A job's locks stay alive while it runs, and its last progress message reaches the hook.

Real qcluster: the job locks descendants with a 2-second TTL and keeps working for longer;
progress is throttled so hard that only the flush at the end of the job can write the last
message before powercrud's completion hook reads (and deletes) it.
"""

from __future__ import annotations

import pytest
from django.core.cache import caches
from django_q.models import Task
from powercrud.async_manager import AsyncManager

from tests.testapp.models import Invoice, InvoiceLine, Observation

pytestmark = [pytest.mark.cluster, pytest.mark.stack, pytest.mark.django_db(transaction=True)]
RECORDING = "tests.testapp.tasks.RecordingManager"


@pytest.fixture
def lines():
    caches["default"].clear()
    invoice = Invoice.objects.create(number="INV-L")
    InvoiceLine.objects.bulk_create(InvoiceLine(invoice=invoice) for _ in range(5))
    yield list(InvoiceLine.objects.values_list("pk", flat=True))
    caches["default"].clear()


def _run(cluster_factory, line_ids, refresh_interval):
    from tests.testapp.tasks import RecordingManager

    cluster = cluster_factory(
        settings={
            "OTEL_TASKCTX": {
                "SPAN_STORE": False,
                "LOCK_TTL": 2,
                "LOCK_REFRESH_INTERVAL": refresh_interval,
                "PROGRESS_MIN_INTERVAL": 60,
            }
        },
        q_cluster={"workers": 1},
    )
    key = RecordingManager().launch_async_task(
        "tests.testapp.tasks.hold_descendants",
        line_ids,
        4.5,
        25,
        manager_class=RECORDING,
    )
    task = cluster.wait_for(lambda: Task.objects.filter(name=key).first(), timeout=40, what="job")
    assert task.success, task.result
    completion = cluster.wait_for(
        lambda: Observation.objects.filter(kind="completion", task_key=key).first(),
        what="the completion hook",
    )
    (holders,) = Observation.objects.filter(kind="holders", task_key=key)
    manager = AsyncManager()
    cluster.wait_for(
        lambda: not manager.check_conflict({"testapp.invoiceline": line_ids}),
        what="locks released",
    )
    return key, holders.value, completion.value


def test_locks_outlive_their_ttl_while_the_job_runs_and_the_last_progress_lands(
    cluster_factory, lines
):
    key, holders, completion = _run(cluster_factory, lines, refresh_interval=0.4)
    assert holders == {str(pk): key for pk in lines}  # still ours after 2 TTLs of work
    assert completion["progress"] == "step 25/25"  # held by the throttle, flushed at job end


def test_control_without_refresh_the_locks_expire_under_the_job(cluster_factory, lines):
    """Shows the test above can fail: with refreshing off, a 2 s TTL lapses mid-job."""
    key, holders, _ = _run(cluster_factory, lines, refresh_interval=0)
    assert set(holders.values()) == {""}
