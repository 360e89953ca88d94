"""``task_always_eager``: Celery runs tasks in the caller. A root task is a job of its own,
nested work runs inline under the caller's key, fan-out is refused (``FanOutUnavailable``),
and a system check says so when eager mode meets a fan-out setting."""

from __future__ import annotations

import json

import pytest
from django.test.utils import override_settings

from otel_taskctx.checks import check_fan_out
from otel_taskctx.errors import FanOutUnavailable
from tests.celery_app import app
from tests.testapp import celery_tasks as jobs
from tests.testapp.celery_tasks import holders

pytestmark = [
    pytest.mark.celery,
    pytest.mark.stack,
    pytest.mark.django_db,
    pytest.mark.usefixtures("export_spans_after_test"),
]


@pytest.fixture
def eager():
    before = app.conf.task_always_eager
    app.conf.task_always_eager = True
    yield
    app.conf.task_always_eager = before


def seen(path, label):
    return json.loads((path / f"{label}.json").read_text())


def test_an_eager_root_task_is_a_job_that_releases_its_locks(eager, tmp_path):
    result = jobs.hold.delay("root", [31, 32], str(tmp_path))
    key = f"celery-{result.id}"
    got = seen(tmp_path, "root")
    assert got["task_key"] == key and got["held"] == {"31": key, "32": key}
    assert result.get() == 2 and holders([31, 32]) == {}


def test_eager_nested_work_runs_inline_under_the_callers_key(eager, tmp_path):
    result = jobs.parent.delay("nested", [33], str(tmp_path))
    key = f"celery-{result.id}"
    child = seen(tmp_path, "nested-child")
    assert (child["task_key"], child["depth"], child["root"]) == (key, 1, key)
    assert seen(tmp_path, "nested-after")["held"] == {"33": key}
    assert result.get() == 1 and holders([33]) == {}


def test_eager_fan_out_is_refused(eager, tmp_path):
    result = jobs.fan.delay("fan", [[34]], str(tmp_path))
    assert result.failed() and isinstance(result.result, FanOutUnavailable)
    assert "task_always_eager runs every task in the caller" in str(result.result)
    assert not (tmp_path / "fan-0.json").exists() and holders([34]) == {}


def test_a_system_check_warns_when_eager_mode_meets_fan_out(eager):
    with override_settings(OTEL_TASKCTX={"FAN_OUT": ["tests.testapp.celery_tasks.part"]}):
        assert [p.id for p in check_fan_out()] == ["otel_taskctx.W073"]
    with override_settings(OTEL_TASKCTX={}):
        assert check_fan_out() == []
    app.conf.task_always_eager = False
    with override_settings(
        CELERY_TASK_ALWAYS_EAGER=True, OTEL_TASKCTX={"NESTED_POLICY": "fan_out"}
    ):
        assert [p.id for p in check_fan_out()] == ["otel_taskctx.W073"]
