"""TaskContextSpanProcessor: lineage attributes, span-borne descendants and progress."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from powercrud.async_manager import AsyncManager

from otel_taskctx import (
    TaskContextSpanProcessor,
    install_span_processor,
    register_descendants,
    report_progress,
    task_context,
)
from otel_taskctx.conflicts import get_conflict_store
from otel_taskctx.processor import PROCESSOR_NAME, span_items
from otel_taskctx.tracer_provider import added_processors

pytestmark = [pytest.mark.stack, pytest.mark.django_db]
MANAGER = "powercrud.async_manager.AsyncManager"
CHILD = "testapp.child"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def manager(cache, settings):
    settings.OTEL_TASKCTX = {"PROGRESS_MIN_INTERVAL": 0}
    return AsyncManager()


@pytest.fixture
def traced():
    """A provider with the user's own exporter first, then our processor."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    processor = TaskContextSpanProcessor()
    provider.add_span_processor(processor)
    return provider.get_tracer("tests"), exporter, processor


def test_spans_in_a_task_carry_the_lineage(manager, traced):
    tracer, exporter, _ = traced
    with tracer.start_as_current_span("outside"):
        pass
    with task_context("root-1", MANAGER):
        with tracer.start_as_current_span("job"):
            with task_context("step-1"):
                with tracer.start_as_current_span("nested"):
                    pass
    spans = {s.name: dict(s.attributes) for s in exporter.get_finished_spans()}
    assert not any(k.startswith("taskctx.") for k in spans["outside"])
    assert spans["job"] == {
        "taskctx.task_key": "root-1",
        "taskctx.root_task_key": "root-1",
        "taskctx.depth": 0,
        "taskctx.manager_class_path": MANAGER,
    }
    assert spans["nested"]["taskctx.task_key"] == "step-1"
    assert spans["nested"]["taskctx.parent_task_key"] == "root-1"
    assert spans["nested"]["taskctx.root_task_key"] == "root-1"
    assert spans["nested"]["taskctx.depth"] == 1


def test_an_explicit_parent_context_decides_the_task(manager, traced):
    tracer, exporter, _ = traced
    from opentelemetry import context

    with task_context("root-2", MANAGER):
        span = tracer.start_span("detached", context=context.Context())
        span.end()
        with tracer.start_as_current_span("attached"):
            pass
    spans = {s.name: dict(s.attributes) for s in exporter.get_finished_spans()}
    assert "taskctx.task_key" not in spans["detached"]
    assert spans["attached"]["taskctx.task_key"] == "root-2"


def test_span_borne_descendants_are_locked_when_the_span_ends(manager, traced):
    tracer, _, _ = traced
    doc = uuid.uuid4()
    with task_context("root-3", MANAGER):
        with tracer.start_as_current_span("save") as span:
            # code that only knows the OpenTelemetry API
            span.add_event(
                "taskctx.descendants",
                {"taskctx.descendants.model": "testapp.Child", "taskctx.descendants.ids": [1, 2]},
            )
            span.set_attributes(
                {
                    "taskctx.descendants.model": "testapp.document",
                    "taskctx.descendants.ids": [str(doc)],
                }
            )
            assert manager.check_conflict({CHILD: [1, 2]}) == set()  # not before on_end
    assert manager.check_conflict({CHILD: [1, 2, 3]}) == {1, 2}
    assert manager.check_conflict({"testapp.document": [str(doc)]}) == {str(doc)}
    assert manager.cache.get(f"powercrud:conflict:model:{CHILD}:1") == "root-3"
    assert len(get_conflict_store(manager).tracked_keys("root-3")) == 3
    manager.remove_conflict_ids("root-3")  # powercrud's release path sees them
    assert manager.check_conflict({CHILD: [1, 2]}) == set()


def test_span_borne_progress_is_reported(manager, traced):
    tracer, _, _ = traced
    with task_context("root-4", MANAGER):
        with tracer.start_as_current_span("step") as span:
            span.add_event("taskctx.progress", {"taskctx.progress": "1 of 3"})
            span.add_event("taskctx.progress", {"taskctx.progress": "2 of 3"})
    assert manager.get_progress("root-4") == "2 of 3"
    with task_context("root-4", MANAGER):
        with tracer.start_as_current_span("step") as span:
            span.set_attribute("taskctx.progress", "3 of 3")
    assert manager.get_progress("root-4") == "3 of 3"


def test_what_the_helpers_forwarded_is_not_forwarded_again(manager, traced):
    tracer, exporter, _ = traced
    store = get_conflict_store(manager)
    with task_context("root-5", MANAGER):
        with tracer.start_as_current_span("save"):
            assert register_descendants(CHILD, [7, 8])
            report_progress("from the helper")
            # released before the span ends: a second forward would lock them again
            store.release("root-5")
            manager.update_progress("root-5", "newer")
    assert manager.check_conflict({CHILD: [7, 8]}) == set()
    assert manager.get_progress("root-5") == "newer"
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "save"]
    assert [e.attributes["taskctx.forwarded"] for e in span.events] == [True, True]
    assert span_items(span) == []


def test_items_marked_forwarded_are_skipped(manager, traced):
    tracer, _, _ = traced
    with task_context("root-6", MANAGER):
        with tracer.start_as_current_span("save") as span:
            span.set_attributes(
                {
                    "taskctx.descendants.model": CHILD,
                    "taskctx.descendants.ids": [9],
                    "taskctx.forwarded": True,
                }
            )
    assert manager.check_conflict({CHILD: [9]}) == set()


def test_a_span_borne_conflict_is_reported_not_raised(manager, caplog):
    seen = []
    provider = TracerProvider()
    provider.add_span_processor(TaskContextSpanProcessor(on_conflict=lambda i, e: seen.append(e)))
    logged = TracerProvider()
    logged.add_span_processor(TaskContextSpanProcessor())
    assert manager.add_conflict_ids("holder", {CHILD: {4}})
    with task_context("root-7", MANAGER):
        for p in (provider, logged):
            with p.get_tracer("t").start_as_current_span("save") as span:
                span.add_event(
                    "taskctx.descendants",
                    {"taskctx.descendants.model": CHILD, "taskctx.descendants.ids": [3, 4]},
                )
    (err,) = seen
    assert err.holder_task_key == "holder" and err.ids == [4]
    assert "held by task holder" in caplog.text
    assert manager.check_conflict({CHILD: [3]}) == set()  # all-or-nothing


class BrokenExporter(SpanExporter):
    def export(self, spans):
        raise RuntimeError("collector down")

    def shutdown(self):
        pass


def test_works_beside_user_processors_and_a_broken_exporter(manager, caplog):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(TaskContextSpanProcessor())  # ours first this time
    provider.add_span_processor(SimpleSpanProcessor(BrokenExporter()))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    caplog.set_level(logging.CRITICAL, logger="opentelemetry")
    with task_context("root-8", MANAGER):
        with provider.get_tracer("t").start_as_current_span("save") as span:
            assert register_descendants(CHILD, [21])
            span.add_event(
                "taskctx.descendants",
                {"taskctx.descendants.model": CHILD, "taskctx.descendants.ids": [22]},
            )
            assert report_progress("still fine")
    assert manager.check_conflict({CHILD: [21, 22]}) == {21, 22}
    assert manager.get_progress("root-8") == "still fine"
    (span,) = exporter.get_finished_spans()
    assert span.attributes["taskctx.task_key"] == "root-8"


def test_with_sampling_off_the_processor_sees_nothing_but_the_helpers_still_lock(manager):
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(TaskContextSpanProcessor())
    with task_context("root-9", MANAGER):
        with provider.get_tracer("t").start_as_current_span("save") as span:
            assert not span.is_recording()
            span.add_event(  # dropped with the span: why the processor cannot be the lock path
                "taskctx.descendants",
                {"taskctx.descendants.model": CHILD, "taskctx.descendants.ids": [31]},
            )
            assert register_descendants(CHILD, [32])
            assert report_progress("unsampled")
    assert manager.check_conflict({CHILD: [31, 32]}) == {32}
    assert manager.get_progress("root-9") == "unsampled"


def test_install_adds_one_processor_and_keeps_the_users():
    provider = trace.get_tracer_provider()
    first = install_span_processor()
    if first is None:  # pragma: no cover - a non-SDK provider is installed globally
        pytest.skip("the global tracer provider is not the SDK's")
    processors = list(provider._active_span_processor._span_processors)
    assert install_span_processor() is first
    assert list(provider._active_span_processor._span_processors) == processors
    assert sum(isinstance(p, TaskContextSpanProcessor) for p in processors) == 1
    assert added_processors(provider)[PROCESSOR_NAME] is first
    assert not [k for k in vars(provider) if "taskctx" in k]  # bookkeeping kept at home


INSTALL_SCRIPT = """
import django
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

exporter = InMemorySpanExporter()
provider = TracerProvider(sampler=TraceIdRatioBased(1.0))
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)  # the application's own set-up, before Django starts
django.setup()  # ready() adds the processor
from otel_taskctx import TaskContextSpanProcessor, task_context

assert trace.get_tracer_provider() is provider
assert provider.sampler.rate == 1.0
procs = provider._active_span_processor._span_processors
assert [type(p).__name__ for p in procs][0] == "SimpleSpanProcessor", procs
assert sum(isinstance(p, TaskContextSpanProcessor) for p in procs) == 1, procs
with task_context("app-1"):
    with trace.get_tracer("t").start_as_current_span("s"):
        pass
(span,) = [s for s in exporter.get_finished_spans() if s.name == "s"]
assert span.attributes["taskctx.task_key"] == "app-1"
print("ok")
"""


def test_ready_adds_the_processor_to_the_applications_provider():
    env = dict(
        os.environ,
        DJANGO_SETTINGS_MODULE="tests.settings",
        # only this feature: no span store writing to the (locked) test database at exit
        TASKCTX_TEST_OTEL_TASKCTX=json.dumps(
            {"SPAN_PROCESSOR": True, "SPAN_STORE": False, "AUTO_INSTRUMENT": False}
        ),
    )
    out = subprocess.run(
        [sys.executable, "-c", INSTALL_SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_the_processor_module_imports_only_opentelemetry():
    code = (
        "import sys, otel_taskctx.processor\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('django', 'powercrud', 'django_q')]\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
