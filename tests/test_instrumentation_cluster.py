"""Worker instrumentation against a real qcluster subprocess (embedded and Redis+PostgreSQL).

Each test starts its own cluster (a few seconds). Jobs write down what they saw as
``Observation`` rows; spans are exported by the cluster to JSON-lines files.
"""

from __future__ import annotations

import pytest
from django_q import tasks as q_tasks
from django_q.models import OrmQ, Task
from powercrud.async_manager import AsyncManager

from tests.testapp.models import Invoice, InvoiceLine, Observation

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.stack,
    pytest.mark.django_db(transaction=True),
    # the django_db marker's fixture is autouse: set up before, torn down after this one
    pytest.mark.usefixtures("export_spans_after_test"),
]

QUIET = {"OTEL_TASKCTX": {"SPAN_STORE": False}}
MANAGER = "powercrud.async_manager.AsyncManager"


def _invoices(count: int, lines: int, fail_first: bool = False) -> list[Invoice]:
    invoices = []
    for i in range(count):
        invoice = Invoice.objects.create(number=f"INV-{i + 1}", fail_lines=fail_first and i == 0)
        InvoiceLine.objects.bulk_create(InvoiceLine(invoice=invoice) for _ in range(lines))
        invoices.append(invoice)
    return invoices


def _finished_task(cluster, name: str, timeout: float = 30.0) -> Task:
    return cluster.wait_for(
        lambda: Task.objects.filter(name=name).first(), timeout=timeout, what=f"task {name}"
    )


def _locks_released(manager: AsyncManager, key: str, conflict_ids: dict) -> bool:
    return (
        not manager.check_conflict({m: list(ids) for m, ids in conflict_ids.items()})
        and manager.cache.get(f"{manager.conflict_prefix}{key}") is None
        and manager.get_progress(key) is None
        and key not in manager.get_active_tasks()
    )


def _queue_empty() -> bool:
    """Nothing queued or unacknowledged (ORM broker rows stay until the monitor acks)."""
    from django_q.brokers import get_broker

    return OrmQ.objects.count() == 0 and get_broker().queue_size() == 0


def _consumers(spans, key):
    return [
        s
        for s in spans
        if s["kind"] == "SpanKind.CONSUMER" and s["attributes"].get("django_q2.task.name") == key
    ]


def _consumer_span(cluster, key):
    (span,) = _consumers(cluster.wait_for_spans(lambda s: _consumers(s, key)), key)
    return span


def _spans_of(spans, **attributes):
    return [
        s
        for s in spans
        if all(s["attributes"].get(name) == value for name, value in attributes.items())
    ]


def test_nested_launch_runs_inline_under_the_parent(cluster_factory, cache):
    cluster = cluster_factory(settings=QUIET)
    invoices = _invoices(2, 3)
    ids = [i.pk for i in invoices]
    line_ids = list(InvoiceLine.objects.values_list("pk", flat=True))
    manager = AsyncManager()
    key = manager.launch_async_task(
        "tests.testapp.tasks.approve_invoices", ids, conflict_ids={"testapp.invoice": set(ids)}
    )
    task = _finished_task(cluster, key)
    assert task.success, task.result
    cluster.wait_for(
        lambda: _locks_released(
            manager, key, {"testapp.invoice": ids, "testapp.invoiceline": line_ids}
        ),
        what="the completion hook to release every lock",
    )

    # no nested job reached the broker: nothing queued, one Task row, no enqueue in a worker
    cluster.wait_for(_queue_empty, what="the broker to acknowledge the parent")
    assert list(Task.objects.values_list("name", flat=True)) == [key]

    # the parent ran as itself, in our identity and in powercrud's own context
    (start,) = Observation.objects.filter(kind="parent_start")
    assert start.value["task_key"] == key
    assert start.value["powercrud_task"] == key
    assert start.value["manager"] == "powercrud.async_manager.AsyncManager"
    assert start.value["depth"] == 0

    # every line was updated by the nested step, before the parent completed, while its lock
    # was held under the parent's key; the nested step ran as the parent at depth 1
    lines = list(InvoiceLine.objects.all())
    assert len(lines) == 6
    for line in lines:
        assert line.status == "approved"
        assert line.updated_at < task.stopped
        assert line.lock_holder == key
        assert (line.seen_task_key, line.seen_depth) == (key, 1)

    # the nested step's progress went to the parent's key; the launch returned a nested id
    after = list(Observation.objects.filter(kind="after_save"))
    assert [a.value["progress"] for a in after] == [
        "invoice INV-1: line 3/3",
        "invoice INV-2: line 3/3",
    ]
    assert all(a.value["invoice_lock"] == key for a in after)
    assert [a.value["nested_id"] for a in after] == [
        f"{key}/nested/1-update_invoice_lines",
        f"{key}/nested/2-update_invoice_lines",
    ]

    consumer = _consumer_span(cluster, key)
    assert consumer["attributes"]["taskctx.task_key"] == key
    spans = cluster.spans()
    assert consumer["attributes"]["messaging.system"] == "django_q2"
    assert not [s for s in spans if s["kind"] == "SpanKind.PRODUCER"]  # nothing was enqueued
    assert consumer["status"]["status_code"] == "UNSET"
    nested = cluster.wait_for_spans(
        lambda s: len(_spans_of(s, **{"taskctx.nested.mode": "inline"})) == 2
    )
    for span in _spans_of(nested, **{"taskctx.nested.mode": "inline"}):
        assert span["name"] == "tests.testapp.tasks.update_invoice_lines"
        assert span["parent_id"] is not None
        assert span["context"]["trace_id"] == consumer["context"]["trace_id"]
        assert span["attributes"]["taskctx.depth"] == 1
        assert span["attributes"]["taskctx.root_task_key"] == key


def test_failing_nested_step_fails_the_parent(cluster_factory, cache):
    cluster = cluster_factory(settings=QUIET)
    invoices = _invoices(2, 3, fail_first=True)
    ids = [i.pk for i in invoices]
    line_ids = list(InvoiceLine.objects.values_list("pk", flat=True))
    manager = AsyncManager()
    key = manager.launch_async_task(
        "tests.testapp.tasks.approve_invoices",
        ids,
        conflict_ids={"testapp.invoice": set(ids)},
        q_options={"ack_failure": True},
    )
    task = _finished_task(cluster, key)
    assert task.success is False
    refused = InvoiceLine.objects.filter(invoice=invoices[0]).order_by("pk")[1]
    assert f"line {refused.pk} of invoice INV-1 refused" in task.result
    cluster.wait_for(
        lambda: _locks_released(
            manager, key, {"testapp.invoice": ids, "testapp.invoiceline": line_ids}
        ),
        what="the completion hook to release every lock",
    )
    cluster.wait_for(_queue_empty, what="the broker to acknowledge the parent")
    assert list(Task.objects.values_list("name", flat=True)) == [key]
    # the first line was updated before the failure; the second invoice never got its turn
    assert InvoiceLine.objects.filter(status="approved").count() == 1

    consumer = _consumer_span(cluster, key)
    spans = cluster.spans()
    assert consumer["status"]["status_code"] == "ERROR"
    assert "refused" in consumer["status"]["description"]
    assert consumer["attributes"]["error.type"] == "ValueError"
    (nested,) = _spans_of(spans, **{"taskctx.nested.mode": "inline"})
    assert nested["status"]["status_code"] == "ERROR"


def _bulk_update_args(invoice: Invoice) -> tuple:
    return (
        "powercrud.tasks.bulk_update_task",
        "testapp.Invoice",
        [invoice.pk],
        None,
        ["status"],
        ["status"],
        [{"field": "status", "value": "approved", "info": {"type": "CharField"}}],
    )


def test_powercrud_bulk_edit_runs_as_its_task(cluster_factory, cache):
    """powercrud's own workers: save()/delete() see the task (both APIs); a failure that
    powercrud swallows (returns False, django-q2 records success) fails the consumer span."""
    cluster = cluster_factory(settings=QUIET)
    ok, failing, doomed = (
        _invoice_with_lines("OK"),
        _invoice_with_lines("BAD", fail=True),
        _invoice_with_lines("DEL"),
    )
    manager = AsyncManager()
    common = {"manager_class": MANAGER}
    ok_key = manager.launch_async_task(
        *_bulk_update_args(ok), conflict_ids={"testapp.invoice": {ok.pk}}, **common
    )
    bad_key = manager.launch_async_task(
        *_bulk_update_args(failing), conflict_ids={"testapp.invoice": {failing.pk}}, **common
    )
    del_key = manager.launch_async_task(
        "powercrud.tasks.bulk_delete_task",
        "testapp.Invoice",
        [doomed.pk],
        None,
        conflict_ids={"testapp.invoice": {doomed.pk}},
        **common,
    )
    for key in (ok_key, bad_key, del_key):
        task = _finished_task(cluster, key)
        assert task.success is True  # django-q2's view, even for the failed bulk update
    assert Task.objects.get(name=bad_key).result is False

    (saved,) = Observation.objects.filter(kind="invoice_save")  # the failed one rolled back
    assert saved.value == {
        "invoice": ok.pk,
        "task_key": ok_key,
        "powercrud_task": ok_key,
        "powercrud_skip_nested": True,
    }
    assert set(ok.lines.values_list("seen_task_key", "seen_depth")) == {(ok_key, 1)}
    (deleted,) = Observation.objects.filter(kind="invoice_delete")
    assert deleted.value == {
        "invoice": doomed.pk,
        "task_key": del_key,
        "powercrud_task": del_key,
        "powercrud_skip_nested": True,
    }
    assert not Invoice.objects.filter(pk=doomed.pk).exists()

    assert _consumer_span(cluster, ok_key)["status"]["status_code"] == "UNSET"
    assert _consumer_span(cluster, del_key)["status"]["status_code"] == "UNSET"
    bad = _consumer_span(cluster, bad_key)
    assert bad["status"]["status_code"] == "ERROR"
    assert bad["attributes"]["error.type"] == "powercrud_reported_failure"
    assert "refused" in bad["attributes"]["taskctx.reported_errors"]
    assert "failed update" in bad["status"]["description"]


def _invoice_with_lines(number: str, lines: int = 2, fail: bool = False) -> Invoice:
    invoice = Invoice.objects.create(number=number, fail_lines=fail)
    InvoiceLine.objects.bulk_create(InvoiceLine(invoice=invoice) for _ in range(lines))
    return invoice


def test_depth_two_lineage_in_the_worker(cluster_factory, cache):
    cluster = cluster_factory(settings=QUIET)
    key = AsyncManager().launch_async_task("tests.testapp.tasks.nest", 2)
    assert _finished_task(cluster, key).success
    seen = [o.value for o in Observation.objects.filter(kind="nest")]
    assert [
        (s["levels"], s["task_key"], s["depth"], s["root"], s["powercrud_task"]) for s in seen
    ] == [
        (2, key, 0, key, key),
        (1, key, 1, key, key),
        (0, key, 2, key, key),
    ]
    consumer = _consumer_span(cluster, key)
    spans = cluster.wait_for_spans(
        lambda s: len(_spans_of(s, **{"taskctx.nested.mode": "inline"})) == 2
    )
    steps = sorted(
        _spans_of(spans, **{"taskctx.nested.mode": "inline"}),
        key=lambda s: s["attributes"]["taskctx.depth"],
    )
    assert [s["attributes"]["taskctx.depth"] for s in steps] == [1, 2]
    assert {s["attributes"]["taskctx.root_task_key"] for s in steps} == {key}
    assert {s["attributes"]["taskctx.task_key"] for s in steps} == {key}
    assert steps[0]["parent_id"] == consumer["context"]["span_id"]
    assert steps[1]["parent_id"] == steps[0]["context"]["span_id"]
    assert [s["attributes"]["taskctx.nested.id"] for s in steps] == [
        f"{key}/nested/1-nest",
        f"{key}/nested/2-nest",
    ]
    assert Task.objects.count() == 1


def test_context_is_clean_between_runs_in_one_worker(cluster_factory, cache):
    """Alternate instrumented parents (some failing) and plain jobs through one worker
    process: no plain job ever sees a task identity, every parent sees exactly its own."""
    cluster = cluster_factory(q_cluster={"workers": 1}, settings=QUIET)
    manager = AsyncManager()
    parents = {}
    for i in range(5):
        parents[f"parent-{i}"] = manager.launch_async_task(
            "tests.testapp.tasks.record_context",
            f"parent-{i}",
            fail=i % 2 == 1,
            q_options={"ack_failure": True},
        )
        q_tasks.async_task("tests.testapp.tasks.record_context", f"plain-{i}")
    cluster.wait_for(lambda: Task.objects.count() == 10, timeout=60, what="ten finished tasks")
    seen = {o.value["label"]: o.value for o in Observation.objects.filter(kind="context")}
    assert len(seen) == 10
    assert len({v["pid"] for v in seen.values()}) == 1  # one worker process ran them all
    for label, value in seen.items():
        if label.startswith("plain"):
            assert (value["task_key"], value["powercrud_task"]) == (None, None), label
            assert "taskctx" not in value["baggage"], label
        else:
            key = parents[label]
            assert (value["task_key"], value["powercrud_task"], value["depth"]) == (key, key, 0)
    assert Task.objects.filter(success=False).count() == 2


def test_recycled_and_timed_out_workers_export_every_span(cluster_factory, cache):
    """recycle=1 and a BatchSpanProcessor that would wait a minute: every worker process
    exits after one job, and each flushes its spans first; so does a timed-out worker."""
    cluster = cluster_factory(
        q_cluster={"workers": 2, "recycle": 1},
        settings=QUIET,
        env={"OTEL_BSP_SCHEDULE_DELAY": "60000"},
    )
    ids = [q_tasks.async_task("tests.testapp.tasks.noop", n) for n in range(6)]
    slow = q_tasks.async_task(
        "tests.testapp.tasks.sleep_for", 30, timeout=1, q_options={"ack_failure": True}
    )

    def consumers(spans):
        return {
            s["attributes"]["messaging.message.id"]: s
            for s in spans
            if s["kind"] == "SpanKind.CONSUMER"
        }

    spans = cluster.wait_for_spans(lambda s: len(consumers(s)) == 7, timeout=30)
    found = consumers(spans)
    assert set(found) == {*ids, slow}
    assert found[slow]["status"]["status_code"] == "ERROR"
    assert found[slow]["attributes"]["error.type"] == "TimeoutException"
    assert all(found[i]["status"]["status_code"] == "UNSET" for i in ids)
    # every job ran in a worker process of its own (recycled after one job)
    files = [p for p in cluster.span_dir.glob("spans-*.jsonl") if "CONSUMER" in p.read_text()]
    assert len(files) == 7
