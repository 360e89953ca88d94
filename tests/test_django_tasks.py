"""Django's task framework (``django.tasks``) through a real ``manage.py db_worker``.

The identity crosses into the worker beside the task (never in its arguments) and is verified
there; a nested
``.enqueue()`` inside a running task runs inline under the task's key; the helpers lock and
report progress without powercrud; the task's locks are released when it ends.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.core.checks import run_checks
from django.test.utils import override_settings
from django_tasks_db.models import DBTaskResult

from otel_taskctx import task_context
from otel_taskctx.models import TaskCarrier
from otel_taskctx.task_manager import TASK_MANAGER_PATH, TaskManager, get_progress
from tests.cluster import REPO_ROOT, SETTINGS_ENV, SPAN_DIR_ENV
from tests.testapp import django_tasks as jobs

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True)]
#: a root task's trace context crosses into db_worker (off by default: it costs a row per task)
TRACE_CONTEXT = {"OTEL_TASKCTX": {"DJANGO_TASKS_TRACE_CONTEXT": True}}


def _worker_command(
    span_dir: Path | None, *extra: str, overrides: dict | None = None
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment of a real ``manage.py db_worker`` on the test database."""
    from django.conf import settings
    from django.db import connections

    env = dict(
        os.environ,
        DJANGO_SETTINGS_MODULE=settings.SETTINGS_MODULE or "tests.settings",
        TASKCTX_DB_NAME=str(connections["default"].settings_dict["NAME"]),
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p),
        PYTHONUNBUFFERED="1",
        OTEL_BSP_SCHEDULE_DELAY="50",
    )
    env.pop(SETTINGS_ENV, None)
    env.pop(SPAN_DIR_ENV, None)
    if overrides:
        env[SETTINGS_ENV] = json.dumps(overrides)
    if span_dir is not None:
        span_dir.mkdir(parents=True, exist_ok=True)
        env[SPAN_DIR_ENV] = str(span_dir)
    argv = [sys.executable, "-m", "tests.cluster", "db_worker", "--no-startup-delay"]
    return [*argv, "--no-reload", "--interval", "0.1", *extra], env


def db_worker(span_dir: Path | None = None, overrides: dict | None = None) -> str:
    """Run every queued task in a real ``db_worker`` process (``--batch``); its output."""
    argv, env = _worker_command(span_dir, "--batch", overrides=overrides)
    proc = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def seen(tmp_path: Path, label: str) -> dict:
    return json.loads((tmp_path / f"{label}.json").read_text())


def spans(span_dir: Path) -> list[dict]:
    return [
        json.loads(line) for f in span_dir.glob("*.jsonl") for line in f.read_text().splitlines()
    ]


def test_identity_crosses_into_db_worker_and_nested_enqueue_runs_inline(tmp_path):
    ids = [101, 102, 103]
    with override_settings(**TRACE_CONTEXT):
        result = jobs.publish.enqueue("book", ids, str(tmp_path))
    stored = DBTaskResult.objects.get(id=result.id)
    assert stored.args_kwargs == {"args": ["book", ids, str(tmp_path)], "kwargs": {}}
    carrier = TaskCarrier.objects.get(result_id=str(result.id)).carrier
    assert carrier["traceparent"] and "taskctx=" not in carrier.get("baggage", "")

    db_worker(tmp_path / "spans", overrides=TRACE_CONTEXT)

    parent, child = seen(tmp_path, "book-parent"), seen(tmp_path, "book-child")
    key = parent["task_key"]
    assert key == f"task-{result.id}" and parent["depth"] == 0
    assert parent["manager"] == TASK_MANAGER_PATH
    # the nested enqueue ran inline: same process, same key, one level deeper
    assert (child["task_key"], child["root"], child["depth"]) == (key, key, 1)
    assert child["pid"] == parent["pid"]
    assert DBTaskResult.objects.count() == 1  # nothing else reached the queue
    # locked under the task's key while it ran, without powercrud; released at the end
    assert child["registered"] and child["held"] == {str(i): key for i in ids}
    store_holders = TaskManager().cache.get_many(
        [f"powercrud:conflict:model:testapp.child:{i}" for i in ids]
    )
    assert store_holders == {}
    assert get_progress(key) == "book-child: 3 children (100%)"
    stored.refresh_from_db()
    assert stored.status == "SUCCESSFUL"
    assert stored.return_value.endswith(":3") and stored.return_value.startswith(f"{key}/nested/")

    found = spans(tmp_path / "spans")
    consumer = next(s for s in found if s["kind"] == "SpanKind.CONSUMER")
    assert consumer["attributes"]["taskctx.task_key"] == key
    assert consumer["attributes"]["messaging.message.id"] == str(result.id)
    assert consumer["context"]["trace_id"] == "0x" + carrier["traceparent"].split("-")[1]
    nested = next(s for s in found if s["name"] == "tests.testapp.django_tasks.sync_chapters")
    assert nested["attributes"]["taskctx.depth"] == 1
    assert nested["parent_id"] == consumer["context"]["span_id"]

    # the viewer's tree of the task, from the span store the worker wrote to
    from otel_taskctx.spans.queries import load_tree

    tree = load_tree(key)
    kinds = {(n.kind, n.name) for n in tree.job_nodes if not n.placeholder}
    assert ("CONSUMER", "process tests.testapp.django_tasks.publish") in kinds
    assert ("INTERNAL", "tests.testapp.django_tasks.sync_chapters") in kinds
    assert tree.summary()["descendants_locked"] == 3


def test_a_failing_nested_task_fails_its_parent(tmp_path):
    result = jobs.publish.enqueue("bad", [201], str(tmp_path), fail_child=True)
    db_worker(tmp_path / "spans")
    stored = DBTaskResult.objects.get(id=result.id)
    assert stored.status == "FAILED"
    assert stored.exception_class_path == "builtins.ValueError"
    assert "bad-child failed on purpose" in stored.traceback
    key = seen(tmp_path, "bad-parent")["task_key"]
    assert TaskManager().cache.get("powercrud:conflict:model:testapp.child:201") is None
    consumer = next(s for s in spans(tmp_path / "spans") if s["kind"] == "SpanKind.CONSUMER")
    assert consumer["status"]["status_code"] == "ERROR"
    assert consumer["attributes"]["error.type"] == "builtins.ValueError"
    assert consumer["attributes"]["taskctx.task_key"] == key


def test_an_identity_that_does_not_verify_is_dropped_with_a_warning(tmp_path):
    forged = "taskctx=v2.eyJrIjoiZXZpbCIsIngiOjk5OTk5OTk5OTl9.AAAAAAAAAAAAAAAAAAAAAA"
    with task_context("job-1", TASK_MANAGER_PATH):  # a fanned-out child of job-1
        result = jobs.observe_child.enqueue("forged", str(tmp_path))
    row = TaskCarrier.objects.get(result_id=str(result.id))
    row.carrier = {**row.carrier, "baggage": forged}
    row.save()
    output = db_worker()
    assert seen(tmp_path, "forged")["task_key"] is None
    assert f"ignoring the task identity of task {result.id}" in output
    assert "it does not verify (bad signature" in output


def test_immediate_backend_runs_nested_work_inline_under_the_callers_key(tmp_path, settings):
    immediate = {"default": {"BACKEND": "django.tasks.backends.immediate.ImmediateBackend"}}
    with override_settings(TASKS=immediate):
        with task_context("job-imm"):
            result = jobs.sync_chapters.enqueue("imm", [301], str(tmp_path))
        assert seen(tmp_path, "imm")["task_key"] == "job-imm"
        assert seen(tmp_path, "imm")["depth"] == 1
        assert result.id.startswith("job-imm/nested/") and result.return_value == 1
        # outside a task: a root task of its own, and its nested step inline under its key
        jobs.publish.enqueue("root", [302], str(tmp_path))
        parent, child = seen(tmp_path, "root-parent"), seen(tmp_path, "root-child")
        assert parent["task_key"].startswith("task-") and child["task_key"] == parent["task_key"]
        assert child["depth"] == 1


def test_dummy_backend_gets_a_check_warning(settings):
    with override_settings(
        TASKS={"default": {"BACKEND": "django.tasks.backends.dummy.DummyBackend"}}
    ):
        found = [m for m in run_checks() if m.id == "otel_taskctx.W060"]
    assert len(found) == 1 and "DummyBackend" in found[0].msg
    assert not [m for m in run_checks() if m.id == "otel_taskctx.W060"]


def test_aenqueue_carries_the_identity_and_runs_nested_work_inline(tmp_path):
    import asyncio

    immediate = {"default": {"BACKEND": "django.tasks.backends.immediate.ImmediateBackend"}}
    with override_settings(TASKS=immediate):
        asyncio.run(jobs.publish.aenqueue("async", [401], str(tmp_path)))
        parent, child = seen(tmp_path, "async-parent"), seen(tmp_path, "async-child")
        assert parent["task_key"].startswith("task-") and parent["depth"] == 0
        assert (child["task_key"], child["depth"]) == (parent["task_key"], 1)

        async def inside_a_task():
            with task_context("job-async"):
                return await jobs.sync_chapters.aenqueue("async-inline", [402], str(tmp_path))

        result = asyncio.run(inside_a_task())
        assert result.id.startswith("job-async/nested/") and result.return_value == 1
        assert seen(tmp_path, "async-inline")["task_key"] == "job-async"


# --------------------------------------------------------------------------- fan-out


def test_fanned_out_tasks_run_as_child_tasks_and_the_job_waits_for_them(tmp_path):
    from opentelemetry.instrumentation.taskctx import barrier

    groups = [[501, 502], [503], [504]]
    result = jobs.publish_parts.enqueue("fan", groups, str(tmp_path))
    db_worker(tmp_path / "spans")

    key = seen(tmp_path, "fan-parent")["task_key"]
    parts = [seen(tmp_path, f"fan-{n}") for n in range(3)]
    for n, part in enumerate(parts):
        # a child task of its own, under the job's key, one level deeper, holding its ids
        assert (part["task_key"], part["root"], part["depth"]) == (key, key, 1)
        assert part["held"] == {str(i): key for i in groups[n]}
        assert part["job_status"] == "RUNNING"  # the job's result waited for its children
    children = DBTaskResult.objects.exclude(id=result.id)
    assert children.count() == 3 and {c.status for c in children} == {"SUCCESSFUL"}
    stored = DBTaskResult.objects.get(id=result.id)
    assert stored.status == "SUCCESSFUL" and stored.return_value == "fan"
    assert stored.finished_at >= max(c.finished_at for c in children)
    ids = [i for g in groups for i in g]
    held = TaskManager().cache.get_many(
        [f"powercrud:conflict:model:testapp.child:{i}" for i in ids]
    )
    assert held == {}
    assert not barrier.has_children(key)

    found = spans(tmp_path / "spans")
    runs = [s for s in found if s["kind"] == "SpanKind.CONSUMER" and "sync_part" in s["name"]]
    job_run = next(s for s in found if s["kind"] == "SpanKind.CONSUMER" and "publish" in s["name"])
    assert len(runs) == 3
    assert {s["attributes"]["taskctx.nested.mode"] for s in runs} == {"fan_out"}
    assert {s["context"]["trace_id"] for s in runs} == {job_run["context"]["trace_id"]}

    from otel_taskctx.spans.queries import load_tree

    tree = load_tree(key)
    consumers = [n for n in tree.job_nodes if n.kind == "CONSUMER" and "sync_part" in n.name]
    assert len(consumers) == 3 and all(n.process for n in consumers)


def test_a_failed_fanned_out_task_fails_its_job_and_its_siblings_still_run(tmp_path):
    from opentelemetry.instrumentation.taskctx import barrier

    result = jobs.publish_parts.enqueue("fanbad", [[601], [602], [603]], str(tmp_path), fail_part=1)
    db_worker()
    stored = DBTaskResult.objects.get(id=result.id)
    assert stored.status == "FAILED"
    assert stored.exception_class_path == "otel_taskctx.errors.FanOutChildFailed"
    assert "fan-out child tests.testapp.django_tasks.sync_part" in stored.traceback
    assert "ValueError: fanbad-1 failed on purpose" in stored.traceback
    assert seen(tmp_path, "fanbad-0") and seen(tmp_path, "fanbad-2")  # the siblings ran
    key = seen(tmp_path, "fanbad-parent")["task_key"]
    held = TaskManager().cache.get_many(
        [f"powercrud:conflict:model:testapp.child:{i}" for i in (601, 602, 603)]
    )
    assert held == {} and not barrier.has_children(key)


def test_a_job_that_raises_after_fanning_out_fails_with_its_own_error_after_its_children(
    tmp_path,
):
    from opentelemetry.instrumentation.taskctx import barrier

    result = jobs.publish_parts.enqueue("self", [[651], [652]], str(tmp_path), fail_self=True)
    db_worker()
    parts = [seen(tmp_path, f"self-{n}") for n in range(2)]
    assert {p["job_status"] for p in parts} == {"RUNNING"}  # held while its children ran
    stored = DBTaskResult.objects.get(id=result.id)
    assert stored.status == "FAILED" and stored.exception_class_path == "builtins.RuntimeError"
    assert "self failed after fanning out" in stored.traceback
    children = DBTaskResult.objects.exclude(id=result.id)
    assert stored.finished_at >= max(c.finished_at for c in children)
    key = seen(tmp_path, "self-parent")["task_key"]
    held = TaskManager().cache.get_many(
        [f"powercrud:conflict:model:testapp.child:{i}" for i in (651, 652)]
    )
    assert held == {} and not barrier.has_children(key)


def test_fan_out_on_a_backend_without_a_worker_is_refused(tmp_path):
    from opentelemetry.instrumentation.taskctx import barrier

    immediate = {"default": {"BACKEND": "django.tasks.backends.immediate.ImmediateBackend"}}
    with override_settings(TASKS=immediate):
        result = jobs.publish_parts.enqueue("immfan", [[701]], str(tmp_path))
        assert result.status == "FAILED"
        assert result.errors[0].exception_class_path == "otel_taskctx.errors.FanOutUnavailable"
        assert "ImmediateBackend" in result.errors[0].traceback
        assert not barrier.has_children(seen(tmp_path, "immfan-parent")["task_key"])
        with override_settings(OTEL_TASKCTX={"DJANGO_TASKS": True, "NESTED_POLICY": "fan_out"}):
            found = [m for m in run_checks() if m.id == "otel_taskctx.W072"]
        assert len(found) == 1 and "ImmediateBackend" in found[0].msg


def test_a_db_worker_killed_under_a_child_never_leaves_the_job_running(tmp_path):
    """With no ``taskctx_sweep``: a long-running db_worker sweeps by itself."""
    import signal

    from opentelemetry.instrumentation.taskctx import barrier

    from tests.testapp.reliability import wait_for_file

    timeout = 2
    fan_out = {"OTEL_TASKCTX": {"FAN_OUT_TIMEOUT": timeout, "FAN_OUT_SWEEP_INTERVAL": 0.5}}
    result = jobs.publish_parts.enqueue("lost", [[801], [802]], str(tmp_path), pause_part=0)
    argv, env = _worker_command(None, overrides=fan_out)
    worker = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL)
    try:
        wait_for_file(tmp_path / "lost-0-pause.reached")  # child 0 runs in the worker
    finally:
        worker.send_signal(signal.SIGKILL)  # ... which dies under it
        worker.wait(timeout=30)
    key = seen(tmp_path, "lost-parent")["task_key"]
    lost = TaskCarrier.objects.get(
        fan_out__startswith="fan-out-",
        result_id__in=[
            r.id for r in DBTaskResult.objects.filter(status="RUNNING").exclude(id=result.id)
        ],
    )
    assert DBTaskResult.objects.get(id=result.id).status == "RUNNING"  # waiting for child 0
    assert TaskManager().cache.get("powercrud:conflict:model:testapp.child:801") == key
    # a db_worker that lives on runs the sibling, and then sweeps by itself
    argv, env = _worker_command(None, overrides=fan_out)
    worker = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while DBTaskResult.objects.get(id=result.id).status == "RUNNING":
            assert time.monotonic() < deadline, "the job still waits for its lost child"
            time.sleep(0.1)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    assert seen(tmp_path, "lost-1")["task_key"] == key
    stored = DBTaskResult.objects.get(id=result.id)
    assert stored.status == "FAILED"
    assert stored.exception_class_path == "otel_taskctx.errors.FanOutChildFailed"
    assert "no result within FAN_OUT_TIMEOUT (2 s)" in stored.traceback
    child = DBTaskResult.objects.get(id=lost.result_id)  # the lost child's own result
    assert child.status == "FAILED"
    assert child.exception_class_path == "otel_taskctx.errors.FanOutChildLost"
    assert "db_worker" in child.traceback and "broker" not in child.traceback
    held = TaskManager().cache.get_many(
        [f"powercrud:conflict:model:testapp.child:{i}" for i in (801, 802)]
    )
    assert held == {} and not barrier.has_children(key)
    assert not TaskCarrier.objects.filter(result_id=lost.result_id).exists()  # the sweep's
