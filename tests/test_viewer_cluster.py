"""End to end: a real nested job in a real qcluster, stored by the span store, shown as a tree."""

from __future__ import annotations

import io
import os
import time

import pytest
from django.core.management import call_command
from django_q.models import Task
from powercrud.async_manager import AsyncManager

from otel_taskctx.models import TaskSpan
from otel_taskctx.spans import flush_span_store
from otel_taskctx.spans.queries import load_tree
from tests.testapp.models import Invoice, InvoiceLine

pytestmark = [pytest.mark.cluster, pytest.mark.stack, pytest.mark.django_db(transaction=True)]

APPROVE = "tests.testapp.tasks.approve_invoices"
NESTED = "tests.testapp.tasks.update_invoice_lines"


def invoices(count, lines, fail_first=False):
    out = []
    for i in range(count):
        invoice = Invoice.objects.create(number=f"INV-{i + 1}", fail_lines=fail_first and i == 0)
        InvoiceLine.objects.bulk_create(InvoiceLine(invoice=invoice) for _ in range(lines))
        out.append(invoice)
    return out


def run_job(cluster, count=2, lines=3, fail_first=False):
    ids = [i.pk for i in invoices(count, lines, fail_first)]
    key = AsyncManager().launch_async_task(APPROVE, ids, conflict_ids={"testapp.invoice": set(ids)})
    task = cluster.wait_for(lambda: Task.objects.filter(name=key).first(), what=f"task {key}")
    flush_span_store()  # the enqueue span of this (the launching) process
    # the worker writes a job's spans on a background thread right after the run (within
    # ~0.2 s): wait for the finished run, no flush from here
    cluster.wait_for(lambda: _run_finished(key), timeout=5, what="the worker's spans")
    return key, task


def _run_finished(key):
    return TaskSpan.objects.filter(
        root_task_key=key, kind="CONSUMER", end_ns__isnull=False
    ).exists()


def test_a_real_nested_job_becomes_a_tree(cluster_factory, cache):
    cluster = cluster_factory()
    key, task = run_job(cluster)
    assert task.success, task.result
    tree = load_tree(key)
    assert tree is not None
    kinds = [(n.depth, n.kind, n.name) for n in tree.nodes]
    assert kinds[0] == (0, "PRODUCER", f"send {APPROVE}")
    assert kinds[1] == (1, "CONSUMER", f"process {APPROVE}")
    nested = [n for n in tree.nodes if n.name == NESTED]
    assert len(nested) == 2  # one inline step per invoice save
    run = tree.nodes[1]
    for step in nested:
        assert step.parent is run or step.parent.parent is run
        assert step.kind == "INTERNAL" and step.task_key == key and step.state == "ok"
        assert step.descendants_count == 3
        assert step.descendants()[0]["model"] == "testapp.invoiceline"
    assert tree.status == "ok" and tree.end_ns is not None
    assert {tree.nodes[0].process, run.process} == set(tree.summary()["processes"])
    assert tree.nodes[0].process != run.process  # launched here, ran in a worker process
    summary = tree.summary()
    assert summary["descendants_locked"] == 6 and summary["nested_steps"] == 2
    assert all(n.critical for n in tree.nodes[:2])

    out = io.StringIO()
    call_command("taskctx_tree", key, "--events", stdout=out)
    lines = [line for line in out.getvalue().splitlines() if "> " not in line]
    assert lines[0].startswith(f"job {key}: OK")
    assert lines[1].startswith(f"send {APPROVE} [producer]")
    assert lines[2].startswith(f"  process {APPROVE} [consumer]")
    assert sum(1 for line in lines if line.lstrip().startswith(f"{NESTED} [internal]")) == 2


def test_a_failed_nested_step_is_the_target(cluster_factory, cache):
    cluster = cluster_factory()
    key, task = run_job(cluster, count=2, lines=3, fail_first=True)
    assert not task.success
    tree = load_tree(key)
    assert tree.status == "error" and tree.target_reason == "failed"
    assert tree.target.name == NESTED
    error = tree.target.errors()[0]
    assert error["type"] == "ValueError" and "refused" in error["message"]
    assert [n.kind for n in tree.expand] == ["PRODUCER", "CONSUMER"][: len(tree.expand)] or (
        tree.expand[1].kind == "CONSUMER"
    )


def test_a_running_job_is_visible_while_it_runs(cluster_factory, cache, settings):
    cluster = cluster_factory()
    key = AsyncManager().launch_async_task("tests.test_viewer_cluster.slow_job", 3.0)
    flush_span_store()

    def running(name):
        return TaskSpan.objects.filter(root_task_key=key, name=name, end_ns=None).first()

    row = cluster.wait_for(lambda: running(f"process {__name__}.slow_job"), what="worker run")
    cluster.wait_for(lambda: running("slow step"), what="the running step's row")
    tree = load_tree(key)
    assert tree.status == "running" and tree.target is not None
    assert tree.target.name == "slow step"  # where the job is now
    cluster.wait_for(lambda: Task.objects.filter(name=key).first(), what="the job to end")
    cluster.wait_for(lambda: _run_finished(key), timeout=5, what="the worker's spans")
    row.refresh_from_db()
    assert row.end_ns is not None and load_tree(key).status == "ok"


def stepping_job(seconds, task_key=None, release_path=None, step_seconds=0.05, **kwargs):
    """Short steps, one after another, until ``release_path`` exists (at most ``seconds``):
    each ``save item`` (with its ``sync lines``) far shorter than the store's running delay."""
    from opentelemetry import trace

    tracer = trace.get_tracer("tests")
    deadline = time.monotonic() + seconds
    while not os.path.exists(release_path) and time.monotonic() < deadline:
        with tracer.start_as_current_span("save item"):
            with tracer.start_as_current_span("sync lines"):
                time.sleep(step_seconds)


def slow_job(seconds, task_key=None, release_path=None, **kwargs):
    """One step that takes ``seconds``; with ``release_path``, until that file exists (at
    most ``seconds``): the test decides when the job ends, not the clock."""
    from opentelemetry import trace

    with trace.get_tracer("tests").start_as_current_span("slow step"):
        if release_path is None:
            time.sleep(seconds)
            return
        deadline = time.monotonic() + seconds
        while not os.path.exists(release_path) and time.monotonic() < deadline:
            time.sleep(0.05)
