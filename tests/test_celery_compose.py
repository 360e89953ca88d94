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

pytestmark = [pytest.mark.celery, pytest.mark.django_db]


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


def test_a_task_run_here_leaves_the_callers_context_as_it_was(both_instrumented, tmp_path):
    before = context.get_current()
    for label in ("first", "second"):
        result = jobs.observe.apply((label, str(tmp_path)))
        seen = json.loads((tmp_path / f"{label}.json").read_text())
        assert seen["task_key"] == f"celery-{result.id}", both_instrumented
        assert current_task() is None, f"{both_instrumented}: a job stays current after {label}"
        assert context.get_current() == before
        assert not trace.get_current_span().get_span_context().is_valid
