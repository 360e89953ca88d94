"""Worker instrumentation in this process: producer carrier, identity of launched jobs,
consumer runs through django-q2's own sync path, nested-launch suppression, uninstrument.

The real-cluster tests are in ``test_instrumentation_cluster.py``.
"""

from __future__ import annotations

import sys
import types
import uuid

import pytest
import wrapt
from django.utils import timezone
from django_q import signals as q_signals
from django_q import tasks as q_tasks
from django_q.models import OrmQ, Task
from django_q.signing import SignedPackage
from opentelemetry import baggage, context, trace
from opentelemetry.instrumentation.taskctx import TaskContextInstrumentor
from opentelemetry.instrumentation.taskctx.producer import CARRIER_KEY
from opentelemetry.instrumentation.taskctx.runs import PLAN_KEY
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from powercrud import async_context as pc_context
from powercrud.async_manager import AsyncManager

from otel_taskctx import (
    DescendantConflict,
    TaskIdentity,
    allow_nested_async,
    current_task,
    task_context,
)
from otel_taskctx.context import context_with_identity
from otel_taskctx.identity import sign
from otel_taskctx.propagation import extract
from otel_taskctx.tracer_provider import add_span_processor_once
from tests.testapp import tasks as test_tasks
from tests.testapp.models import Invoice, InvoiceLine, Observation

MANAGER = "powercrud.async_manager.AsyncManager"


class ReportingManager(AsyncManager):
    """A manager subclass: its launches carry this class path."""


pytestmark = pytest.mark.usefixtures("export_spans_after_test")


@pytest.fixture
def spans():
    processor = add_span_processor_once(
        "tests.instrumentation.memory", lambda: SimpleSpanProcessor(InMemorySpanExporter())
    )
    exporter = processor.span_exporter
    exporter.clear()
    yield exporter
    exporter.clear()


def _queued() -> list[dict]:
    return [row.task for row in OrmQ.objects.order_by("pk")]


def _invoice(lines: int = 3, fail: bool = False, number: str = "INV-1") -> Invoice:
    invoice = Invoice.objects.create(number=number, fail_lines=fail)
    InvoiceLine.objects.bulk_create(InvoiceLine(invoice=invoice) for _ in range(lines))
    return invoice


def _lock(manager: AsyncManager, label: str, pk) -> str | None:
    return manager.cache.get(f"{manager.conflict_model_prefix}{label}:{pk}")


def test_instrumented_by_the_app():
    assert TaskContextInstrumentor().is_instrumented_by_opentelemetry
    assert isinstance(q_tasks.async_task, wrapt.FunctionWrapper)
    # the name powercrud imported at import time was rebound too
    from powercrud import async_manager

    assert async_manager.async_task is q_tasks.async_task


# --------------------------------------------------------------------------- producer


@pytest.mark.django_db
def test_enqueue_carries_trace_context_in_the_package_not_in_kwargs(spans):
    tracer = trace.get_tracer("tests")
    with tracer.start_as_current_span("request") as outer:
        token = context.attach(baggage.set_baggage("tenant", "acme"))
        try:
            task_id = q_tasks.async_task("tests.testapp.tasks.noop", 1, group="g")
        finally:
            context.detach(token)
    (package,) = _queued()
    assert package["id"] == task_id
    assert package["kwargs"] == {}
    carrier = package[CARRIER_KEY]
    assert set(carrier) >= {"traceparent", "baggage"}
    assert "taskctx" not in carrier["baggage"]
    ctx = extract(carrier)
    assert baggage.get_baggage("tenant", ctx) == "acme"
    (producer,) = [s for s in spans.get_finished_spans() if s.kind == SpanKind.PRODUCER]
    assert producer.name == "send tests.testapp.tasks.noop"
    assert producer.parent.span_id == outer.get_span_context().span_id
    assert trace.get_current_span(ctx).get_span_context().span_id == producer.context.span_id
    assert producer.attributes["messaging.system"] == "django_q2"
    assert producer.attributes["messaging.message.id"] == task_id
    assert producer.attributes["django_q2.task.group"] == "g"
    assert current_task() is None


@pytest.mark.django_db
def test_a_failed_enqueue_fails_its_span_and_restores_the_callers_context(spans):
    def refuse(sender=None, task=None, **kwargs):
        raise RuntimeError("broker refused the package")

    q_signals.pre_enqueue.connect(refuse, dispatch_uid="tests.refuse", weak=False)
    tracer = trace.get_tracer("tests")
    try:
        with tracer.start_as_current_span("request") as outer:
            with pytest.raises(RuntimeError, match="broker refused"):
                q_tasks.async_task("tests.testapp.tasks.noop", 1)
            # the enqueue's context (its span, its plan) is gone again
            assert trace.get_current_span() is outer
            assert context.get_value(PLAN_KEY) is None
    finally:
        q_signals.pre_enqueue.disconnect(dispatch_uid="tests.refuse")
    assert _queued() == []
    (producer,) = [s for s in spans.get_finished_spans() if s.kind == SpanKind.PRODUCER]
    assert producer.status.status_code is StatusCode.ERROR
    assert producer.attributes["error.type"] == "RuntimeError"
    assert [e.name for e in producer.events] == ["exception"]


def test_launch_async_task_gives_the_job_its_own_identity(cache, spans):
    key = AsyncManager().launch_async_task("tests.testapp.tasks.noop", 1)
    sub_key = ReportingManager().launch_async_task("tests.testapp.tasks.noop", 2)
    bulk_key = AsyncManager().launch_async_task(
        "tests.testapp.tasks.noop", 3, manager_class="tests.test_instrumentation.ReportingManager"
    )
    packages = {p["name"]: p for p in _queued()}
    expected = {
        key: MANAGER,
        sub_key: "tests.test_instrumentation.ReportingManager",
        bulk_key: "tests.test_instrumentation.ReportingManager",
    }
    for name, manager in expected.items():
        package = packages[name]
        assert CARRIER_KEY not in package["kwargs"]
        identity = current_task_in(extract(package[CARRIER_KEY]))
        assert (identity.task_key, identity.manager_class_path, identity.depth) == (
            name,
            manager,
            0,
        )
    producers = [s for s in spans.get_finished_spans() if s.kind == SpanKind.PRODUCER]
    assert sorted(s.attributes["taskctx.launched_task_key"] for s in producers) == sorted(expected)
    assert current_task() is None


def test_launch_records_the_launching_user_on_the_producer_span(cache, spans, django_user_model):
    user = django_user_model.objects.create_user("alice", password="x")
    key = AsyncManager().launch_async_task("tests.testapp.tasks.noop", 1, user=user)
    AsyncManager().launch_async_task("tests.testapp.tasks.noop", 2)  # no user: no attribute
    producers = {
        s.attributes["taskctx.launched_task_key"]: s
        for s in spans.get_finished_spans()
        if s.kind == SpanKind.PRODUCER
    }
    assert producers[key].attributes["enduser.id"] == str(user.pk)
    assert producers[key].attributes["taskctx.user"] == "alice"
    others = [s for k, s in producers.items() if k != key]
    assert others and all("enduser.id" not in s.attributes for s in others)


def current_task_in(ctx):
    token = context.attach(ctx)
    try:
        return current_task()
    finally:
        context.detach(token)


def test_outside_a_task_nothing_is_suppressed(cache):
    q_tasks.async_task("tests.testapp.tasks.noop", 1)
    AsyncManager().launch_async_task("tests.testapp.tasks.noop", 2)
    assert [p["args"] for p in _queued()] == [(1,), (2,)]


# --------------------------------------------------------------------------- consumer


def _run_sync(task: dict) -> None:
    """django-q2's own in-process path: worker() then monitor()."""
    q_tasks._sync(SignedPackage.dumps(task))


def _package(func: str, name: str, carrier: dict | None, *args, **kwargs) -> dict:
    task = {
        "id": uuid.uuid4().hex,
        "name": name,
        "func": func,
        "args": args,
        "kwargs": kwargs,
        "sync": True,
        "started": timezone.now(),
    }
    if carrier is not None:
        task[CARRIER_KEY] = carrier
    return task


@pytest.mark.stack
@pytest.mark.django_db
def test_sync_run_sees_its_identity_and_restores_the_caller(cache, spans):
    key = AsyncManager().launch_async_task("tests.testapp.tasks.record_context", "sync", sync=True)
    (seen,) = Observation.objects.filter(kind="context")
    assert seen.value["task_key"] == key
    assert seen.value["powercrud_task"] == key
    assert seen.value["manager"] == MANAGER
    assert Task.objects.get(name=key).success is True
    assert current_task() is None and pc_context.get_current_task() is None
    (consumer,) = [s for s in spans.get_finished_spans() if s.kind == SpanKind.CONSUMER]
    (producer,) = [s for s in spans.get_finished_spans() if s.kind == SpanKind.PRODUCER]
    assert consumer.name == "process tests.testapp.tasks.record_context"
    assert consumer.parent.span_id == producer.context.span_id
    assert consumer.attributes["taskctx.task_key"] == key
    assert consumer.attributes["taskctx.root_task_key"] == key
    assert consumer.attributes["taskctx.depth"] == 0
    assert consumer.attributes["django_q2.task.name"] == key
    assert consumer.status.status_code == StatusCode.UNSET


@pytest.mark.stack
@pytest.mark.django_db
def test_sync_failure_marks_the_consumer_span_failed(cache, spans):
    with pytest.raises(RuntimeError, match="boom failed on purpose"):
        q_tasks.async_task("tests.testapp.tasks.record_context", "boom", fail=True, sync=True)
    (consumer,) = [s for s in spans.get_finished_spans() if s.kind == SpanKind.CONSUMER]
    assert consumer.status.status_code == StatusCode.ERROR
    assert "boom failed on purpose" in consumer.status.description
    assert consumer.attributes["error.type"] == "RuntimeError"
    assert [e.name for e in consumer.events] == ["exception"]
    assert current_task() is None and pc_context.get_current_task() is None
    assert baggage.get_all() == {}


@pytest.mark.stack
@pytest.mark.django_db
def test_consumer_ignores_forged_and_misbound_identities(cache):
    forged = {"baggage": "taskctx=v2.eyJrIjoiZXZpbCJ9.AAAAAAAAAAAAAAAAAAAAAA"}
    _run_sync(_package("tests.testapp.tasks.record_context", "forged", forged, "forged"))
    other = {}
    from otel_taskctx import inject

    inject(other, context_with_identity(TaskIdentity("someone-else", MANAGER)))
    _run_sync(_package("tests.testapp.tasks.record_context", "mine", other, "misbound"))
    _run_sync(_package("tests.testapp.tasks.record_context", "plain", None, "no-carrier"))
    seen = {o.value["label"]: o.value for o in Observation.objects.filter(kind="context")}
    assert set(seen) == {"forged", "misbound", "no-carrier"}
    for value in seen.values():
        assert value["task_key"] is None
        assert value["powercrud_task"] is None
        assert "taskctx" not in value["baggage"]


@pytest.mark.django_db
def test_an_identity_that_expired_in_the_queue_still_names_its_job(cache):
    from otel_taskctx import inject

    carrier = {}
    token = sign(TaskIdentity("late-job", MANAGER), ttl_seconds=-60)  # expired a minute ago
    inject(carrier, baggage.set_baggage("taskctx", token, context.Context()))
    _run_sync(_package("tests.testapp.tasks.record_context", "late-job", carrier, "late"))
    _run_sync(_package("tests.testapp.tasks.record_context", "other-job", carrier, "stolen"))
    seen = {o.value["label"]: o.value for o in Observation.objects.filter(kind="context")}
    assert (seen["late"]["task_key"], seen["late"]["powercrud_task"]) == ("late-job", "late-job")
    assert (seen["stolen"]["task_key"], seen["stolen"]["powercrud_task"]) == (None, None)


def _bulk_update(invoice: Invoice) -> str:
    """Launch powercrud's own bulk_update_task the way its views do (here in sync mode)."""
    return AsyncManager().launch_async_task(
        "powercrud.tasks.bulk_update_task",
        "testapp.Invoice",
        [invoice.pk],
        None,
        ["status"],
        ["status"],
        [{"field": "status", "value": "approved", "info": {"type": "CharField"}}],
        str(uuid.uuid4()),
        manager_class=MANAGER,
        sync=True,
    )


@pytest.mark.stack
@pytest.mark.django_db
def test_powercrud_bulk_update_runs_as_its_task(cache, spans):
    invoice = _invoice()
    key = _bulk_update(invoice)
    assert Task.objects.get(name=key).result is True
    # the save() inside powercrud's worker saw the task both ways
    (save,) = Observation.objects.filter(kind="invoice_save")
    assert save.value == {
        "invoice": invoice.pk,
        "task_key": key,
        "powercrud_task": key,
        "powercrud_skip_nested": True,
    }
    assert set(InvoiceLine.objects.values_list("seen_task_key", flat=True)) == {key}
    (consumer,) = [s for s in spans.get_finished_spans() if s.kind == SpanKind.CONSUMER]
    assert consumer.status.status_code == StatusCode.UNSET


@pytest.mark.stack
@pytest.mark.django_db
def test_powercrud_bulk_failure_marks_the_consumer_span_failed(cache, spans):
    key = _bulk_update(_invoice(fail=True))
    # django-q2 records a success: powercrud caught the error and returned False
    task = Task.objects.get(name=key)
    assert (task.success, task.result) == (True, False)
    (consumer,) = [s for s in spans.get_finished_spans() if s.kind == SpanKind.CONSUMER]
    assert consumer.status.status_code == StatusCode.ERROR
    assert "failed update" in consumer.status.description
    assert "refused" in consumer.attributes["taskctx.reported_errors"]
    assert consumer.attributes["error.type"] == "powercrud_reported_failure"
    assert InvoiceLine.objects.filter(status="approved").count() == 0  # rolled back


# --------------------------------------------------------------------------- suppression


@pytest.mark.stack
@pytest.mark.django_db
def test_nested_launch_runs_inline_with_locks_and_progress_under_the_parent(cache, spans):
    invoice = _invoice()
    line_ids = list(invoice.lines.values_list("pk", flat=True))
    manager = AsyncManager()
    with task_context("job-1", MANAGER):
        invoice.status = "approved"
        invoice.save()
        assert invoice.nested_launch_id == "job-1/nested/1-update_invoice_lines"
        assert [_lock(manager, "testapp.invoiceline", pk) for pk in line_ids] == ["job-1"] * 3
        assert manager.get_progress("job-1") == "invoice INV-1: line 3/3"
        tracking = manager.cache.get(f"{manager.conflict_prefix}job-1")
        assert len(tracking) == 3
    assert OrmQ.objects.count() == 0 and Task.objects.count() == 0
    lines = list(InvoiceLine.objects.all())
    assert {(ln.status, ln.lock_holder, ln.seen_task_key, ln.seen_depth) for ln in lines} == {
        ("approved", "job-1", "job-1", 1)
    }
    (step,) = [s for s in spans.get_finished_spans() if s.name.endswith("update_invoice_lines")]
    assert step.kind == SpanKind.INTERNAL
    assert step.attributes["taskctx.nested.id"] == "job-1/nested/1-update_invoice_lines"
    assert step.attributes["taskctx.depth"] == 1
    assert step.attributes["taskctx.root_task_key"] == "job-1"
    assert [e.name for e in step.events] == ["taskctx.descendants"]
    # the parent's completion releases everything the nested step took
    manager.remove_active_task("job-1")
    assert not manager.check_conflict({"testapp.invoiceline": line_ids})


@pytest.mark.stack
@pytest.mark.django_db
def test_nested_conflict_raises_and_nothing_runs(cache):
    invoice = _invoice()
    line_ids = sorted(invoice.lines.values_list("pk", flat=True))
    manager = AsyncManager()
    assert manager.add_conflict_ids("other-job", {"testapp.invoiceline": {line_ids[1]}})
    with task_context("job-2", MANAGER):
        invoice.status = "approved"
        with pytest.raises(DescendantConflict) as caught:
            invoice.save()
    assert caught.value.holder_task_key == "other-job"
    assert caught.value.ids == [line_ids[1]]
    assert InvoiceLine.objects.filter(status="approved").count() == 0
    assert [_lock(manager, "testapp.invoiceline", pk) for pk in line_ids] == [
        None,
        "other-job",
        None,
    ]


@pytest.mark.django_db
def test_nested_exception_propagates_to_the_caller(cache, spans):
    invoice = _invoice(fail=True)
    with task_context("job-3", MANAGER):
        invoice.status = "approved"
        with pytest.raises(ValueError, match="refused"):
            invoice.save()
        assert current_task().depth == 0  # the nested step's context was left
    (step,) = [s for s in spans.get_finished_spans() if s.name.endswith("update_invoice_lines")]
    assert step.status.status_code == StatusCode.ERROR
    assert step.attributes["error.type"] == "ValueError"


@pytest.mark.django_db
def test_suppressed_async_task_drops_queue_options(cache):
    with task_context("job-4"):
        first = q_tasks.async_task(
            test_tasks.echo,
            "a",
            hook="powercrud.async_hooks.task_completion_hook",
            group="g",
            timeout=5,
            q_options={"ack_failure": True},
            task_name="ignored",
            task_key="requested",
            colour="red",
        )
        second = q_tasks.async_task("tests.testapp.tasks.echo", "b")
    assert first == "job-4/nested/1-echo"
    assert second == "job-4/nested/2-echo"
    assert OrmQ.objects.count() == 0
    one, two = (o.value for o in Observation.objects.filter(kind="echo"))
    assert one["args"] == ["a"]
    assert one["kwarg_names"] == ["colour", "task_key"]
    assert one["task_key_kwarg"] == "job-4"
    assert (one["task_key"], one["depth"], one["root"]) == ("job-4", 1, "job-4")
    assert two["kwarg_names"] == [] and two["args"] == ["b"]


@pytest.mark.django_db
def test_suppressed_launch_passes_the_parent_key_as_task_key(cache):
    with task_context("job-5", MANAGER):
        nested = ReportingManager().launch_async_task(
            "tests.testapp.tasks.echo", "x", str(uuid.uuid4()), user=None, save=False, colour=1
        )
    assert nested == "job-5/nested/1-echo"
    (seen,) = (o.value for o in Observation.objects.filter(kind="echo"))
    assert seen["args"] == ["x"]  # the trailing UUID (powercrud's task name) is not passed on
    assert seen["kwarg_names"] == ["colour", "task_key"]
    assert seen["task_key_kwarg"] == "job-5"
    assert seen["manager"] == MANAGER  # the lock holder's manager, not the launching one
    assert OrmQ.objects.count() == 0


@pytest.mark.stack
@pytest.mark.django_db
def test_depth_two_lineage_names_the_top_level_task_as_root(cache, spans):
    with task_context("top", MANAGER):
        test_tasks.nest(2, task_key="top")
    seen = [o.value for o in Observation.objects.filter(kind="nest")]
    assert [(s["levels"], s["task_key"], s["depth"], s["root"]) for s in seen] == [
        (2, "top", 0, "top"),
        (1, "top", 1, "top"),
        (0, "top", 2, "top"),
    ]
    steps = sorted(
        (s for s in spans.get_finished_spans() if s.name == "tests.testapp.tasks.nest"),
        key=lambda s: s.attributes["taskctx.depth"],
    )
    assert [s.attributes["taskctx.depth"] for s in steps] == [1, 2]
    assert {s.attributes["taskctx.root_task_key"] for s in steps} == {"top"}
    assert [s.attributes["taskctx.nested.id"] for s in steps] == [
        "top/nested/1-nest",
        "top/nested/2-nest",
    ]
    assert steps[1].parent.span_id == steps[0].context.span_id


@pytest.mark.django_db
def test_allow_nested_async_enqueues_detached_jobs(cache):
    with task_context("job-6", MANAGER):
        with allow_nested_async():
            q_tasks.async_task("tests.testapp.tasks.noop", 1)
            key = AsyncManager().launch_async_task("tests.testapp.tasks.noop", 2)
        assert current_task().task_key == "job-6"
    plain, launched = _queued()
    assert current_task_in(extract(plain[CARRIER_KEY])) is None
    assert "traceparent" in plain[CARRIER_KEY]
    identity = current_task_in(extract(launched[CARRIER_KEY]))
    assert (identity.task_key, identity.depth, identity.parent_task_key) == (key, 0, None)
    assert key != "job-6"


@pytest.mark.django_db
def test_enqueue_nested_setting_still_enqueues(cache, settings):
    settings.OTEL_TASKCTX = {"ENQUEUE_NESTED": ["tests.testapp.tasks.noop"]}
    with task_context("job-7"):
        q_tasks.async_task("tests.testapp.tasks.noop", 1)
        q_tasks.async_task(test_tasks.noop, 2)
        inline = q_tasks.async_task("tests.testapp.tasks.echo", 3)
    assert inline == "job-7/nested/1-echo"
    queued = _queued()
    assert [p["args"] for p in queued] == [(1,), (2,)]
    assert all(current_task_in(extract(p[CARRIER_KEY])) is None for p in queued)


@pytest.mark.django_db
def test_tampered_identity_in_baggage_neither_suppresses_nor_travels(cache):
    """Baggage is untrusted: a tampered token makes no task, so the launch is enqueued."""
    tampered = sign(TaskIdentity("victim", MANAGER)) + "x"
    token = context.attach(baggage.set_baggage("taskctx", tampered))
    try:
        assert current_task() is None
        q_tasks.async_task("tests.testapp.tasks.noop", 1)
    finally:
        context.detach(token)
    (package,) = _queued()
    assert "taskctx" not in package[CARRIER_KEY].get("baggage", "")


# --------------------------------------------------------------------------- uninstrument


def _receivers(signal) -> list:
    return [(key, ref()) for key, ref, *_ in signal.receivers]


SIGNALS = (
    q_signals.pre_enqueue,
    q_signals.pre_execute,
    q_signals.post_execute_in_worker,
    q_signals.post_spawn,
)


@pytest.mark.django_db
def test_uninstrument_restores_originals_and_signal_receivers(cache):
    import django
    from django_q import scheduler
    from powercrud import async_manager

    instrumentor = TaskContextInstrumentor()
    wrapper = q_tasks.async_task
    original = wrapper.__wrapped__
    launch_wrapper = vars(AsyncManager)["launch_async_task"]
    launch_original = launch_wrapper.__wrapped__
    assert isinstance(launch_wrapper, wrapt.FunctionWrapper)
    setup = django.setup
    late = types.ModuleType("tests._late_importer")
    late.async_task = q_tasks.async_task  # imported while instrumented
    sys.modules[late.__name__] = late
    try:
        instrumentor.uninstrument()
        assert q_tasks.async_task is original
        assert async_manager.async_task is original
        assert scheduler.async_task is original
        assert late.async_task is original
        assert vars(AsyncManager)["launch_async_task"] is launch_original
        assert django.setup is setup
        bare = {signal: _receivers(signal) for signal in SIGNALS}
        for signal in SIGNALS:
            assert not [k for k, _ in bare[signal] if "otel_taskctx.instrumentation" in str(k[0])]

        # uninstrumented: a launch inside a task is enqueued, with no carrier
        with task_context("job-u"):
            q_tasks.async_task("tests.testapp.tasks.noop", 1)
        (package,) = _queued()
        assert CARRIER_KEY not in package

        instrumentor.instrument()
        for signal in SIGNALS:
            added = [r for r in _receivers(signal) if r not in bare[signal]]
            assert len(added) == 1
        instrumentor.uninstrument()
        assert {signal: _receivers(signal) for signal in SIGNALS} == bare
        assert q_tasks.async_task is original
        assert vars(AsyncManager)["launch_async_task"] is launch_original
    finally:
        sys.modules.pop(late.__name__, None)
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument()
    assert async_manager.async_task is q_tasks.async_task is not original
