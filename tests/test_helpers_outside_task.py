"""Outside a task the helpers do nothing: they say so at DEBUG, once per call site."""

from __future__ import annotations

import logging
import sys

import pytest

from otel_taskctx import descendants, register_descendants, report_progress, task_context
from tests.testapp.models import Child

pytestmark = [pytest.mark.django_db]
MANAGER = "powercrud.async_manager.AsyncManager"
HERE = __file__


@pytest.fixture
def debug_log(caplog, monkeypatch, cache):
    monkeypatch.setattr(descendants, "_outside_task_sites", set())
    caplog.set_level(logging.DEBUG, logger="otel_taskctx")
    return caplog


def messages(caplog) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "otel_taskctx"]


def test_each_call_site_is_logged_once_at_debug(debug_log):
    lines = []
    for _ in range(3):  # the same two call sites, three times each
        lines.append(sys._getframe().f_lineno + 1)
        reg = register_descendants(Child, [1, 2])
        assert not reg and reg.reason == "not inside a task"
        lines.append(sys._getframe().f_lineno + 1)
        assert report_progress("chapter 1/2") is False
    other = sys._getframe().f_lineno + 1
    assert not register_descendants("testapp.Child", [3])  # a third call site

    assert messages(debug_log) == [
        (
            logging.DEBUG,
            f"register_descendants() called outside a task at {HERE}:{lines[0]}: "
            "nothing was reserved",
        ),
        (
            logging.DEBUG,
            f"report_progress() called outside a task at {HERE}:{lines[1]}: "
            "the message was not stored",
        ),
        (
            logging.DEBUG,
            f"register_descendants() called outside a task at {HERE}:{other}: nothing was reserved",
        ),
    ]


def test_inside_a_task_nothing_is_logged(debug_log):
    with task_context("inside-1", MANAGER):
        assert register_descendants(Child, [1, 2])
        assert report_progress("working") is True
    assert not [m for m in messages(debug_log) if "outside a task" in m[1]]


def test_a_site_first_called_while_debug_is_off_is_logged_once_debug_is_on(debug_log):
    def save():
        return register_descendants(Child, [7])

    logging.getLogger("otel_taskctx").setLevel(logging.INFO)
    assert not save()
    assert messages(debug_log) == []
    logging.getLogger("otel_taskctx").setLevel(logging.DEBUG)
    assert not save()
    assert not save()
    assert len(messages(debug_log)) == 1
