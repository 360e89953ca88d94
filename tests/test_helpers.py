"""register_descendants / report_progress against powercrud's real AsyncManager and cache."""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from powercrud.async_manager import AsyncManager

from otel_taskctx import (
    DescendantConflict,
    register_descendants,
    report_progress,
    task_context,
)
from otel_taskctx.descendants import model_label
from tests.testapp.models import Child, Document, Tag

pytestmark = [pytest.mark.django_db, pytest.mark.stack]
MANAGER = "powercrud.async_manager.AsyncManager"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def manager(cache):
    return AsyncManager()


def test_model_label_normalisation():
    assert model_label(Child) == "testapp.child"
    assert model_label(Child(id=1)) == "testapp.child"
    assert model_label("testapp.Child") == "testapp.child"
    assert model_label("otherapp.SomeModel") == "otherapp.somemodel"
    with pytest.raises(ValueError):
        model_label("NoDot")
    with pytest.raises(TypeError):
        model_label(42)


def test_outside_a_task_nothing_happens(manager):
    result = register_descendants(Child, [1, 2])
    assert not result
    assert result.reason == "not inside a task"
    assert manager.check_conflict({"testapp.child": [1, 2]}) == set()
    assert report_progress("hello") is False


def test_locks_are_visible_to_powercrud_and_released_by_its_cleanup(manager):
    with task_context("parent-1", MANAGER):
        result = register_descendants(Child, [1, 2, 3])
    assert result and result.task_key == "parent-1"
    assert sorted(result.reserved) == [1, 2, 3]
    assert manager.check_conflict({"testapp.child": [1, 2, 3, 4]}) == {1, 2, 3}
    assert manager.cache.get("powercrud:conflict:model:testapp.child:2") == "parent-1"
    # powercrud's completion path releases descendant locks with the task's other locks
    manager.remove_conflict_ids("parent-1")
    assert manager.check_conflict({"testapp.child": [1, 2, 3]}) == set()


def test_conflict_names_model_ids_and_holder_and_reserves_nothing(manager):
    assert manager.add_conflict_ids("other-task", {"testapp.child": {2, 5}})
    with task_context("parent-2", MANAGER):
        with pytest.raises(DescendantConflict) as info:
            register_descendants("testapp.Child", [1, 2, 3, 4, 5])
    err = info.value
    assert err.model == "testapp.child"
    assert err.ids == [2, 5]
    assert err.holder_task_key == "other-task"
    assert err.task_key == "parent-2"
    assert "testapp.child ids [2, 5] are held by task other-task" in str(err)
    # nothing partially reserved: 1, 3, 4 are free, 2 and 5 still belong to the holder
    assert manager.check_conflict({"testapp.child": [1, 3, 4]}) == set()
    assert manager.cache.get("powercrud:conflict:model:testapp.child:2") == "other-task"
    assert not manager.cache.get("powercrud:async:conflict:parent-2")


def test_ids_already_held_by_the_same_task_are_fine(manager):
    with task_context("parent-3", MANAGER):
        first = register_descendants(Child, [1, 2])
        second = register_descendants(Child, [2, 3])
    assert sorted(first.reserved) == [1, 2]
    assert second.reserved == [3] and second.already_held == [2]
    tracking = manager.cache.get("powercrud:async:conflict:parent-3")
    assert tracking == {f"powercrud:conflict:model:testapp.child:{i}" for i in (1, 2, 3)}
    manager.remove_conflict_ids("parent-3")
    assert manager.check_conflict({"testapp.child": [1, 2, 3]}) == set()


def test_a_conflict_keeps_locks_the_task_already_held(manager):
    manager.add_conflict_ids("holder", {"testapp.child": {9}})
    with task_context("parent-4", MANAGER):
        register_descendants(Child, [7])
        with pytest.raises(DescendantConflict):
            register_descendants(Child, [7, 8, 9])
    assert manager.cache.get("powercrud:conflict:model:testapp.child:7") == "parent-4"
    assert manager.check_conflict({"testapp.child": [8]}) == set()


def test_string_and_uuid_primary_keys(manager):
    doc_ids = [uuid.uuid4(), uuid.uuid4()]
    with task_context("parent-5", MANAGER):
        register_descendants(Tag, ["alpha", "beta"])
        register_descendants(Document, doc_ids)
    assert manager.check_conflict({"testapp.tag": ["alpha", "beta", "gamma"]}) == {"alpha", "beta"}
    assert manager.check_conflict({"testapp.document": doc_ids}) == set(doc_ids)


def test_nested_task_context_locks_under_the_inner_key(manager):
    with task_context("outer", MANAGER):
        with task_context("inner"):
            register_descendants(Child, [11])
    assert manager.cache.get("powercrud:conflict:model:testapp.child:11") == "inner"


def test_report_progress_is_visible_via_get_progress(manager):
    with task_context("parent-6", MANAGER):
        assert report_progress("chapter 3/10") is True
    assert manager.get_progress("parent-6") == "chapter 3/10"


def test_manager_class_path_must_be_an_async_manager(manager):
    with task_context("parent-7", "django.contrib.auth.models.User"):
        with pytest.raises(TypeError, match="not an AsyncManager"):
            register_descendants(Child, [1])
    assert manager.check_conflict({"testapp.child": [1]}) == set()


NO_SDK_SCRIPT = """
import django
django.setup()
from opentelemetry import trace
from otel_taskctx import register_descendants, report_progress, task_context
assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider), trace.get_tracer_provider()
with task_context("parent-8", "powercrud.async_manager.AsyncManager"):
    assert not trace.get_current_span().is_recording()
    assert register_descendants("testapp.Child", [21, 22])
    assert report_progress("working")
print("ok")
"""


@pytest.mark.django_db(transaction=True)
def test_helpers_work_with_no_sdk_configured(settings):
    """A process where nothing configured an SDK: the API's no-op provider is in use."""
    from django.core.cache import cache

    cache.clear()
    env = dict(
        os.environ,
        DJANGO_SETTINGS_MODULE="tests.settings",
        TASKCTX_DB_NAME=settings.DATABASES["default"]["NAME"],
        TASKCTX_TEST_OTEL_TASKCTX=json.dumps(
            {"SPAN_PROCESSOR": False, "SPAN_STORE": False, "AUTO_INSTRUMENT": False}
        ),
    )
    out = subprocess.run(
        [sys.executable, "-c", NO_SDK_SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    manager = AsyncManager()
    assert manager.check_conflict({"testapp.child": [21, 22]}) == {21, 22}
    assert manager.get_progress("parent-8") == "working"
    cache.clear()


def test_helpers_work_when_sampling_drops_every_span(manager):
    provider = TracerProvider(sampler=ALWAYS_OFF)
    with task_context("parent-9", MANAGER):
        with provider.get_tracer("t").start_as_current_span("save"):
            assert register_descendants(Child, [31])
            assert report_progress("sampled out")
    assert manager.check_conflict({"testapp.child": [31]}) == {31}
    assert manager.get_progress("parent-9") == "sampled out"


def test_helpers_record_what_they_did_on_the_current_span(manager):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with task_context("parent-10", MANAGER):
        with provider.get_tracer("t").start_as_current_span("save"):
            register_descendants(Child, [41, 42])
            report_progress("2 children")
    (span,) = exporter.get_finished_spans()
    events = {e.name: dict(e.attributes) for e in span.events}
    assert events["taskctx.descendants"]["taskctx.descendants.count"] == 2
    assert events["taskctx.descendants"]["taskctx.forwarded"] is True
    assert events["taskctx.progress"]["taskctx.progress"] == "2 children"
