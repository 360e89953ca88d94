"""otel_taskctx beside opentelemetry-instrumentation-celery in one process, instrumented in
either order: a task's run leaves the caller's context as it found it (no job and no ended
span stays current after it), and the task's body runs under its job and under the CONSUMER
span of whichever instrumentation made it."""

from __future__ import annotations

import json

import pytest
from opentelemetry import context, trace
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.instrumentation.taskctx import TaskContextInstrumentor
from opentelemetry.sdk.trace import TracerProvider

from otel_taskctx import current_task
from tests.testapp import celery_tasks as jobs

pytestmark = [
    pytest.mark.celery,
    pytest.mark.django_db,
    pytest.mark.usefixtures("export_spans_after_test"),
]


@pytest.fixture(params=["theirs-after-ours", "theirs-before-ours"])
def both_instrumented(request):
    ours, theirs = TaskContextInstrumentor(), CeleryInstrumentor()
    provider = TracerProvider()
    if request.param == "theirs-before-ours":
        ours.uninstrument()
        theirs.instrument(tracer_provider=provider)
        ours.instrument()
    else:
        theirs.instrument(tracer_provider=provider)
    try:
        yield request.param
    finally:
        theirs.uninstrument()
        if not ours.is_instrumented_by_opentelemetry:
            ours.instrument()


@pytest.fixture
def eager():
    from tests.celery_app import app

    before = app.conf.task_always_eager
    app.conf.task_always_eager = True
    yield
    app.conf.task_always_eager = before


def test_a_task_run_here_leaves_the_callers_context_as_it_was(both_instrumented, eager, tmp_path):
    before = context.get_current()
    for label in ("first", "second"):
        result = jobs.observe.delay(label, str(tmp_path))  # eager: a job run here
        seen = json.loads((tmp_path / f"{label}.json").read_text())
        assert seen["task_key"] == f"celery-{result.id}", both_instrumented
        assert current_task() is None, f"{both_instrumented}: a job stays current after {label}"
        assert context.get_current() == before
        assert not trace.get_current_span().get_span_context().is_valid


def test_an_explicit_apply_outside_a_job_is_a_plain_run(both_instrumented, tmp_path):
    """``Task.apply()`` is Celery's "run it here": no job, so nested launches in it are
    published as Celery would (Celery's own tests rely on it)."""
    jobs.observe.apply(("plain", str(tmp_path)))
    assert json.loads((tmp_path / "plain.json").read_text())["task_key"] is None
    assert current_task() is None


@pytest.mark.stack
@pytest.mark.parametrize("order", ["before", "after"])
def test_a_worker_runs_each_task_under_its_job_with_their_header(celery_worker, tmp_path, order):
    """The publisher carries opentelemetry-instrumentation-celery's own ``traceparent``
    header (its worker side enters a context of its own from it): every task of a worker
    process, the first one too, still runs under its job."""
    from tests.test_celery import wait_seen

    theirs = CeleryInstrumentor()
    theirs.instrument(tracer_provider=TracerProvider())
    try:
        worker = celery_worker(env={"TASKCTX_CELERY_OTEL": order}, concurrency=1)
        results = {label: jobs.observe.delay(label, str(tmp_path)) for label in ("w1", "w2")}
        for label, result in results.items():
            seen = wait_seen(worker, tmp_path, label)
            assert seen["task_key"] == f"celery-{result.id}", (order, label)
    finally:
        theirs.uninstrument()
