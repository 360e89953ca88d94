"""Progress with a fraction: the stored text ends in "(NN%)", which powercrud's bar shows.

(The bar itself, in powercrud's modal, is checked in a browser by test_sample_browser.py.)
"""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from powercrud.async_manager import AsyncManager

from otel_taskctx import TaskContextSpanProcessor, report_progress, task_context
from otel_taskctx.progress import progress_text

pytestmark = [pytest.mark.django_db, pytest.mark.stack]
MANAGER = "powercrud.async_manager.AsyncManager"


@pytest.fixture
def manager(cache, settings):
    settings.OTEL_TASKCTX = {"PROGRESS_MIN_INTERVAL": 0}  # every message written through
    return AsyncManager()


def test_progress_text():
    assert progress_text("syncing") == "syncing"
    assert progress_text("chapter 4/5 synced", done=4, total=5) == "chapter 4/5 synced (80%)"
    assert progress_text("x", done=0, total=3) == "x (0%)"
    assert progress_text("x", done=2, total=3) == "x (66%)"  # rounded down
    assert progress_text("x", done=1999, total=2000) == "x (99%)"  # 100% only when done
    assert progress_text("x", done=3, total=3) == "x (100%)"
    for done, total in [(1, None), (None, 1), (4, 3), (-1, 3), (0, 0), (True, 2)]:
        with pytest.raises(ValueError):
            progress_text("x", done=done, total=total)
    assert progress_text("x", done=7, total=9) == "x (77%)"


def test_report_progress_with_done_and_total(manager):
    with task_context("fraction-1", MANAGER):
        assert report_progress("Book #2: chapter 1/3 synced", done=1, total=3) is True
    assert manager.get_progress("fraction-1") == "Book #2: chapter 1/3 synced (33%)"
    with task_context("fraction-1", MANAGER):
        assert report_progress("plain message") is True  # as before: the text as given
    assert manager.get_progress("fraction-1") == "plain message"
    with task_context("fraction-1", MANAGER), pytest.raises(ValueError):
        report_progress("bad", done=4, total=3)
    assert manager.get_progress("fraction-1") == "plain message"


def test_span_borne_progress_carries_the_fraction(manager):
    provider = TracerProvider()
    provider.add_span_processor(TaskContextSpanProcessor())
    tracer = provider.get_tracer("tests")
    with task_context("fraction-2", MANAGER):
        with tracer.start_as_current_span("Book.save") as span:
            span.add_event(
                "taskctx.progress",
                {
                    "taskctx.progress": "chapter 2/5",
                    "taskctx.progress.done": 2,
                    "taskctx.progress.total": 5,
                },
            )
    assert manager.get_progress("fraction-2") == "chapter 2/5 (40%)"
    with task_context("fraction-2", MANAGER):
        with tracer.start_as_current_span("Book.save") as span:  # a fraction that makes no
            span.set_attribute("taskctx.progress", "last word")  # sense is left out
            span.set_attribute("taskctx.progress.done", 9)
            span.set_attribute("taskctx.progress.total", 5)
    assert manager.get_progress("fraction-2") == "last word"
    provider.shutdown()
