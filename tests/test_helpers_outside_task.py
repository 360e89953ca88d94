"""Outside a task the helpers do nothing: they say so at DEBUG, naming the caller's line."""

from __future__ import annotations

import logging
import sys

import pytest

from otel_taskctx import register_descendants, report_progress, task_context
from tests.testapp.models import Child

pytestmark = [pytest.mark.django_db]
MANAGER = "powercrud.async_manager.AsyncManager"
HERE = __file__


@pytest.fixture
def debug_log(caplog, cache):
    caplog.set_level(logging.DEBUG, logger="otel_taskctx")
    return caplog


def messages(caplog) -> list[tuple[int, str, str, int]]:
    return [
        (r.levelno, r.getMessage(), r.pathname, r.lineno)
        for r in caplog.records
        if r.name == "otel_taskctx"
    ]


def test_each_call_is_logged_at_debug_with_its_call_site(debug_log):
    lines = []
    for _ in range(2):
        lines.append(sys._getframe().f_lineno + 1)
        reg = register_descendants(Child, [1, 2])
        assert not reg and reg.reason == "not inside a task"
        lines.append(sys._getframe().f_lineno + 1)
        assert report_progress("chapter 1/2") is False
    reserved = "register_descendants() called outside a task: nothing was reserved"
    stored = "report_progress() called outside a task: the message was not stored"
    assert messages(debug_log) == [
        (logging.DEBUG, reserved, HERE, lines[0]),
        (logging.DEBUG, stored, HERE, lines[1]),
        (logging.DEBUG, reserved, HERE, lines[2]),
        (logging.DEBUG, stored, HERE, lines[3]),
    ]


def test_inside_a_task_nothing_is_logged(debug_log):
    with task_context("inside-1", MANAGER):
        assert register_descendants(Child, [1, 2])
        assert report_progress("working") is True
    assert not [m for m in messages(debug_log) if "outside a task" in m[1]]


def test_nothing_is_logged_while_debug_is_off(debug_log):
    logging.getLogger("otel_taskctx").setLevel(logging.INFO)
    assert not register_descendants(Child, [7])
    assert messages(debug_log) == []
