"""Bad carriers in task packages, and baggage size.

* Malformed carriers (wrong types, huge, truncated, another task's identity) in the package of
  a job launched by powercrud: the job still runs, as a plain job (no identity, in
  otel_taskctx or in powercrud's context), the worker process does not crash or get replaced,
  and a warning is logged. The next job in the same worker runs as itself.
* Descendant ids never travel in baggage, however many a job locks; with a user's own large
  baggage (over the W3C limits) the identity still propagates through a real cluster, first in
  the header, and the user's baggage is cut to the limits.
"""

from __future__ import annotations

import logging
import re

import pytest
from django_q import signals as q_signals
from django_q.models import Task
from opentelemetry import baggage, context
from opentelemetry.instrumentation.taskctx.producer import CARRIER_KEY
from powercrud.async_manager import AsyncManager

from otel_taskctx import (
    allow_nested_async,
    current_task,
    extract,
    inject,
    register_descendants,
    task_context,
)
from otel_taskctx.context import identity_from_context
from otel_taskctx.identity import BAGGAGE_ENTRY, TaskIdentity, sign

REPORT = "tests.testapp.reliability.report_context"
MANAGER = "powercrud.async_manager.AsyncManager"
W3C_MAX_HEADER = 8192
W3C_MAX_PAIRS = 180
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _genuine(task_key: str) -> str:
    return sign(TaskIdentity(task_key, MANAGER))


def _bad_carriers(genuine_carrier: dict[str, str], other_key: str) -> dict[str, tuple]:
    """label -> (carrier or a function of the job's own carrier, warning regex or None)."""
    token_of_other = _genuine(other_key)
    return {
        "int": (12345, r"ignoring trace carrier of type int"),
        "list": (["traceparent", TRACEPARENT], r"ignoring trace carrier of type list"),
        "str": (f"traceparent={TRACEPARENT}", r"ignoring trace carrier of type str"),
        "value-types": (
            {"traceparent": 42, "baggage": b"taskctx=v2.x.y", "tracestate": ["a=b"]},
            r"ignoring malformed 'traceparent' entry in trace carrier",
        ),
        "huge-baggage": (
            lambda own: {**own, "baggage": own["baggage"] + ",pad=" + "y" * 100_000},
            r"ignoring malformed 'baggage' entry in trace carrier",
        ),
        "huge-carrier": (
            lambda own: {
                **{f"junk-{n}": "z" * 100 for n in range(20_000)},
                "traceparent": "00-" + "f" * 20_000,
                "baggage": own["baggage"] + "," + ",".join(f"k{n}=v" for n in range(5_000)),
            },
            r"ignoring malformed 'traceparent' entry in trace carrier",
        ),
        "truncated-token": (
            lambda own: {**own, "baggage": own["baggage"][: len(own["baggage"]) // 2]},
            None,  # see test_truncated_identity_is_logged
        ),
        "another-task": (
            lambda own: {**own, "baggage": f"{BAGGAGE_ENTRY}={token_of_other}"},
            r"ignoring the identity of task \S+: it names task " + re.escape(other_key),
        ),
    }


class _CarrierRewriter:
    """A pre_enqueue receiver, connected after the instrumentation's: replaces the carrier
    that the instrumentation wrote for the named tasks (and remembers the original)."""

    def __init__(self) -> None:
        self.plan: dict[str, object] = {}
        self.original: dict[str, dict[str, str]] = {}
        self.label = None

    def __call__(self, sender=None, task=None, **kwargs):
        self.original[task["name"]] = dict(task.get(CARRIER_KEY) or {})
        if self.label is None:
            return
        bad = self.plan[self.label]
        task[CARRIER_KEY] = bad(task[CARRIER_KEY]) if callable(bad) else bad


@pytest.fixture
def rewriter():
    receiver = _CarrierRewriter()
    q_signals.pre_enqueue.connect(receiver, weak=False, dispatch_uid="test-carriers")
    yield receiver
    q_signals.pre_enqueue.disconnect(dispatch_uid="test-carriers")


@pytest.mark.cluster
@pytest.mark.stack
@pytest.mark.django_db(transaction=True)
def test_malformed_carriers_run_as_plain_jobs(cluster_factory, rewriter, cache):
    cluster = cluster_factory(
        q_cluster={"workers": 1}, settings={"OTEL_TASKCTX": {"SPAN_STORE": False}}
    )
    (worker,) = cluster.worker_pids()
    manager = AsyncManager()
    rewriter.plan = {label: bad for label, (bad, _) in _bad_carriers({}, "someone-else").items()}
    expected = {label: warning for label, (_, warning) in _bad_carriers({}, "someone-else").items()}
    keys = {}
    for label in rewriter.plan:
        rewriter.label = label
        keys[label] = manager.launch_async_task(REPORT, label)
    rewriter.label = None
    good = manager.launch_async_task(REPORT, "good")

    names = [*keys.values(), good]
    cluster.wait_for(
        lambda: Task.objects.filter(name__in=names).count() == len(names), what="every job"
    )
    tasks = {t.name: t for t in Task.objects.filter(name__in=names)}
    for label, key in keys.items():
        task = tasks[key]
        assert task.success, (label, task.result)
        seen = task.result["seen"]
        assert (label, seen["task_key"], seen["powercrud_task"]) == (label, None, None)
        assert BAGGAGE_ENTRY not in seen["baggage"], label
        assert task.result["kwarg"] == key  # powercrud's own kwarg still arrives
        assert seen["pid"] == worker
    # the next job in the same worker runs as itself
    assert tasks[good].result["seen"]["task_key"] == good
    assert tasks[good].result["seen"]["pid"] == worker

    log = cluster.log_text()
    for label, warning in expected.items():
        if warning:
            assert re.search(warning, log), f"no warning for {label}: {warning}"
    assert cluster.worker_pids() == [worker]
    assert "reincarnated" not in log and "Traceback" not in log
    assert cluster.alive


@pytest.mark.django_db
def test_truncated_identity_is_logged(caplog):
    """A package's carrier is written by our producer inside django-q2's signed package, so an
    identity that no longer verifies there (truncated, wrong key) is an anomaly worth a
    warning: the job silently runs unlocked and unnested otherwise."""
    from django_q.signing import SignedPackage  # noqa: F401  (the package is signed)
    from opentelemetry.instrumentation.taskctx import consumer

    own: dict[str, str] = {}
    with task_context("job-truncated", MANAGER):
        inject(own)
    truncated = {**own, "baggage": own["baggage"][: len(own["baggage"]) // 2]}
    task = {
        "id": "x",
        "name": "job-truncated",
        "func": "tests.testapp.tasks.noop",
        CARRIER_KEY: truncated,
    }
    with caplog.at_level(logging.WARNING, logger="otel_taskctx"):
        consumer.on_pre_execute(task=task)
        try:
            assert current_task() is None
        finally:
            task["success"] = True
            consumer.on_post_execute(task=task)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("does not verify" in m and "job-truncated" in m for m in warnings), caplog.text


@pytest.mark.parametrize(
    "carrier",
    [
        12345,
        ["traceparent", TRACEPARENT],
        {"traceparent": 42, "baggage": b"taskctx=v2.x.y"},
        {"baggage": "taskctx=" + "A" * 100_000},
        {"traceparent": "00-" + "f" * 9_000},
    ],
    ids=["int", "list", "value-types", "huge-baggage", "huge-traceparent"],
)
def test_extract_ignores_malformed_carriers_with_a_warning(carrier, caplog):
    with caplog.at_level(logging.WARNING, logger="otel_taskctx"):
        ctx = extract(carrier)
    assert identity_from_context(ctx) is None
    assert baggage.get_baggage(BAGGAGE_ENTRY, ctx) is None
    assert [r for r in caplog.records if r.levelno == logging.WARNING]


# --------------------------------------------------------------------------- baggage size


def _baggage_header(carrier: dict[str, str]) -> str:
    return carrier.get("baggage", "")


@pytest.mark.stack
@pytest.mark.django_db(transaction=True)
def test_descendant_ids_never_travel_in_baggage(rewriter, cache):
    """5,000 registered descendants + 500 more through a launch: the identity is the
    only entry the job adds to baggage, in the context and in the package it enqueues."""
    ids = range(5_000_000, 5_005_000)
    with task_context("job-many-ids", MANAGER):
        registration = register_descendants("testapp.Child", ids)
        assert len(registration.reserved) == 5_000
        in_job: dict[str, str] = {}
        inject(in_job)
        with allow_nested_async():  # really enqueued: its package carries the parent context
            AsyncManager().launch_async_task(
                "tests.testapp.tasks.noop",
                conflict_ids={"testapp.child": set(range(6_000_000, 6_000_500))},
            )
    (launched,) = [c for name, c in rewriter.original.items()]
    for carrier in (in_job, launched):
        header = _baggage_header(carrier)
        assert header.startswith(f"{BAGGAGE_ENTRY}=")
        assert header.count("=") <= 3  # one entry (a token may end in base64 padding)
        assert len(header) < 400
        assert not re.search(r"500\d{4}|600\d{4}", str(carrier))
    from django_q.brokers import get_broker

    get_broker().purge_queue()
    AsyncManager().remove_conflict_ids("job-many-ids")


def _large_user_baggage() -> context.Context:
    """Over every W3C limit: 200 entries, ~12 KB, one entry alone over 4 KB."""
    ctx = baggage.set_baggage("huge", "h" * 5_000)
    for n in range(200):
        ctx = baggage.set_baggage(f"user.{n:03d}", "u" * 50, ctx)
    return ctx


@pytest.mark.cluster
@pytest.mark.stack
@pytest.mark.django_db(transaction=True)
def test_identity_propagates_past_a_large_user_baggage(cluster_factory, rewriter, cache):
    cluster = cluster_factory(settings={"OTEL_TASKCTX": {"SPAN_STORE": False}})
    token = context.attach(_large_user_baggage())
    try:
        key = AsyncManager().launch_async_task(REPORT, "large", register=2_000)
    finally:
        context.detach(token)
    task = cluster.wait_for(lambda: Task.objects.filter(name=key).first(), what=f"task {key}")
    assert task.success, task.result

    sent = _baggage_header(rewriter.original[key])
    assert sent.startswith(f"{BAGGAGE_ENTRY}=")  # first, so the limits never cut it
    assert len(sent.encode()) <= W3C_MAX_HEADER
    assert sent.count(",") + 1 <= W3C_MAX_PAIRS
    assert "huge=" not in sent  # one entry over 4 KB is dropped, as W3C says

    seen = task.result["seen"]
    assert seen["task_key"] == key and seen["powercrud_task"] == key
    users = [b for b in seen["baggage"] if b.startswith("user.")]
    assert 100 < len(users) < 200  # cut to the limits, the rest arrived
    # inside the job, after locking 2,000 descendants, the carrier of anything it enqueues
    again = _baggage_header(task.result["carrier"])
    assert again.startswith(f"{BAGGAGE_ENTRY}=")
    assert len(again.encode()) <= W3C_MAX_HEADER
    assert not re.search(r"1000\d{4}", str(task.result["carrier"]))
    assert identity_from_context(extract(task.result["carrier"])).task_key == key
