"""A long job of short steps: the step open now gets a running row at the store's next pass.

Spans get a running row once they have run ``running_delay`` seconds; under a span that has
one, the spans open at the store's next pass are recorded however young they are.
"""

from __future__ import annotations

import time

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind

from otel_taskctx.models import TaskSpan
from otel_taskctx.spans import DatabaseSpanExporter, RunningSpanProcessor

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True)]
RUNNING_DELAY = 1.0


@pytest.fixture
def tracer():
    provider = TracerProvider()
    provider.add_span_processor(
        BatchSpanProcessor(DatabaseSpanExporter(), schedule_delay_millis=60_000)
    )
    provider.add_span_processor(
        RunningSpanProcessor(running_delay=RUNNING_DELAY, schedule_delay_millis=50)
    )
    yield provider.get_tracer("tests")
    provider.shutdown()


def running_names() -> set[str]:
    return set(TaskSpan.objects.filter(end_ns__isnull=True).values_list("name", flat=True))


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_the_step_open_under_a_recorded_run_is_recorded_at_once(tracer):
    run = tracer.start_span("process job", kind=SpanKind.CONSUMER)
    with trace.use_span(run, end_on_exit=True):
        assert wait_for(lambda: running_names() == {"process job"}, RUNNING_DELAY + 2)
        # short steps, each well under the running delay
        started = time.monotonic()
        with tracer.start_as_current_span("Book.save"):
            with tracer.start_as_current_span("sync chapters"):
                assert wait_for(
                    lambda: running_names() == {"process job", "Book.save", "sync chapters"},
                    0.5,
                )
                assert time.monotonic() - started < RUNNING_DELAY
        with tracer.start_as_current_span("finished before the pass"):
            pass
        with tracer.start_as_current_span("Book.save #2"):
            assert wait_for(lambda: "Book.save #2" in running_names(), 0.5)
        # a step that ended before the store's pass costs one write (its finished row), as ever
        assert "finished before the pass" not in set(
            TaskSpan.objects.values_list("name", flat=True)
        )


def test_young_spans_outside_a_recorded_one_wait_for_the_running_delay(tracer):
    with tracer.start_as_current_span("short job"):
        with tracer.start_as_current_span("its step"):
            time.sleep(0.5)
            assert running_names() == set()
