"""A ``django.tasks`` identity counts only for the task it was issued for, on real db_workers.

A root task's identity never travels: the worker derives it from the task's own result id, and
the task's arguments stay the caller's. A fanned-out child's identity travels in a carrier kept
beside the task (``otel_taskctx.models.TaskCarrier``), bound to the child's result id. A copied,
forged, foreign, damaged or hand-made carrier runs the task as a plain task, with a warning
naming the task: no lock is taken and none is released. A running task's locks are kept alive
past their TTL.
"""

from __future__ import annotations

import subprocess
import time

import pytest
from django.test.utils import override_settings
from django_tasks_db.models import DBTaskResult

from otel_taskctx import task_context
from otel_taskctx.identity import TaskIdentity, configure_signing, reset_signing, sign, verify
from otel_taskctx.models import TaskCarrier
from otel_taskctx.task_manager import TASK_MANAGER_PATH, TaskManager
from tests.cluster import REPO_ROOT
from tests.test_django_tasks import _worker_command, db_worker, seen
from tests.testapp import django_tasks as jobs
from tests.testapp.reliability import wait_for_file

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True)]
CARRIER = "_otel_taskctx"
JOB = "job-victim"


def holders(ids: list[int]) -> dict[int, str]:
    keys = {f"powercrud:conflict:model:testapp.child:{i}": i for i in ids}
    return {keys[k]: v for k, v in TaskManager().cache.get_many(list(keys)).items()}


def carrier_of(result) -> dict:
    return TaskCarrier.objects.get(result_id=str(result.id)).carrier


def put_carrier(result, carrier) -> None:
    fan_out = carrier.get("fan_out", "") if isinstance(carrier, dict) else ""
    TaskCarrier.objects.update_or_create(
        result_id=str(result.id), defaults={"carrier": carrier, "fan_out": fan_out}
    )


def token_of(carrier: dict) -> str:
    return carrier["baggage"].removeprefix("taskctx=")


def child_of_job(task, *args, **kwargs):
    """A genuine fanned-out child of the job ``JOB``, enqueued through the library."""
    with task_context(JOB, TASK_MANAGER_PATH):
        return task.enqueue(*args, **kwargs)


def wait_until(condition, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout}s")
        time.sleep(0.05)
    return value


def test_a_root_tasks_identity_is_its_own_and_nothing_travels(tmp_path):
    result = jobs.hold_children.enqueue("own", [1], str(tmp_path))
    stored = DBTaskResult.objects.get(id=result.id)
    assert stored.args_kwargs == {"args": ["own", [1], str(tmp_path)], "kwargs": {}}
    assert (result.args, result.kwargs) == (["own", [1], str(tmp_path)], {})
    assert not TaskCarrier.objects.exists()  # nothing beside the task either

    output = db_worker()
    own = seen(tmp_path, "own")
    assert own["task_key"] == f"task-{result.id}" and own["depth"] == 0
    assert own["manager"] == TASK_MANAGER_PATH
    assert own["held"] == {"1": f"task-{result.id}"}  # locked under its own key ...
    assert holders([1]) == {}  # ... and released at its end
    assert "ignoring the task identity" not in output


def test_a_childs_identity_is_bound_to_the_child(tmp_path):
    child = child_of_job(jobs.observe_child, "child", str(tmp_path))
    carrier = carrier_of(child)
    identity = verify(token_of(carrier))
    assert (identity.task_key, identity.bound_to, identity.depth) == (JOB, str(child.id), 1)
    assert DBTaskResult.objects.get(id=child.id).args_kwargs["kwargs"] == {}
    db_worker()
    assert seen(tmp_path, "child")["task_key"] == JOB
    assert not TaskCarrier.objects.filter(result_id=str(child.id)).exists()  # gone at its end


def test_a_carrier_copied_from_a_finished_task_runs_as_a_plain_task(tmp_path):
    source = child_of_job(jobs.hold_child, "source", [11], str(tmp_path))
    copied = carrier_of(source)  # read before it ran: the row goes when the task ends
    db_worker()
    assert seen(tmp_path, "source")["task_key"] == JOB

    target = jobs.hold_child.enqueue("copy", [12], str(tmp_path))
    put_carrier(target, copied)
    output = db_worker()
    copy = seen(tmp_path, "copy")
    assert copy["task_key"] is None and not copy["registered"] and copy["held"] == {}
    assert f"ignoring the task identity of task {target.id}" in output
    assert f"it was issued for {source.id}" in output
    assert holders([11, 12]) == {11: JOB}  # the job's, untouched; nothing for the copy


def test_a_carrier_copied_from_a_running_task_neither_runs_under_its_key_nor_frees_its_locks(
    tmp_path,
):
    running = child_of_job(jobs.hold_child, "running", [21, 22], str(tmp_path), pause=True)
    copied = carrier_of(running)
    argv, env = _worker_command(None)
    worker = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL)
    try:
        wait_for_file(tmp_path / "running-pause.reached")
        assert holders([21, 22]) == {21: JOB, 22: JOB}
        target = jobs.hold_child.enqueue("copy", [21, 23], str(tmp_path))
        put_carrier(target, copied)
        output = db_worker()  # a second worker runs the copy while the source still runs
        copy = seen(tmp_path, "copy")
        assert copy["task_key"] is None and not copy["registered"]
        assert f"it was issued for {running.id}" in output
        assert holders([21, 22, 23]) == {21: JOB, 22: JOB}  # the copy released nothing
        assert DBTaskResult.objects.get(id=running.id).status == "RUNNING"
        (tmp_path / "running-pause.go").write_text("")
        wait_until(
            lambda: DBTaskResult.objects.get(id=running.id).status == "SUCCESSFUL",
            "the source task's end",
        )
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    assert seen(tmp_path, "running")["held"] == {"21": JOB, "22": JOB}
    assert holders([21, 22]) == {21: JOB, 22: JOB}  # still the job's: its completion frees them


def _signed_elsewhere(identity: TaskIdentity) -> str:
    """``identity`` signed with another deployment's key."""
    try:
        configure_signing("another deployment's secret")
        return sign(identity)
    finally:
        reset_signing()


def test_bad_carriers_run_the_task_as_a_plain_task_with_a_warning(tmp_path, caplog):
    path = str(tmp_path)
    donor = child_of_job(jobs.observe_child, "donor", path)
    donor_carrier = carrier_of(donor)

    # passed by hand to .enqueue(): an argument like any other; the task is its own root
    by_hand = jobs.observe_child.enqueue("by-hand", path, **{CARRIER: donor_carrier})
    assert f"enqueued with a {CARRIER} keyword argument" in caplog.text
    assert not TaskCarrier.objects.filter(result_id=str(by_hand.id)).exists()

    cases = {}
    for label in ("other-key", "truncated", "oversized", "not-a-dict", "list"):
        cases[label] = child_of_job(jobs.observe_child, label, path)
    rid = str(cases["other-key"].id)
    foreign = _signed_elsewhere(TaskIdentity(JOB, TASK_MANAGER_PATH, depth=1, bound_to=rid))
    own = carrier_of(cases["other-key"])
    put_carrier(cases["other-key"], {**own, "baggage": f"taskctx={foreign}"})
    own = carrier_of(cases["truncated"])
    put_carrier(cases["truncated"], {**own, "baggage": own["baggage"][:-6]})
    own = carrier_of(cases["oversized"])
    put_carrier(cases["oversized"], {**own, "baggage": "taskctx=v2." + "A" * 9000})
    put_carrier(cases["not-a-dict"], "taskctx=v2.forged")
    put_carrier(cases["list"], [own])

    output = db_worker()

    assert seen(tmp_path, "donor")["task_key"] == JOB
    hand = seen(tmp_path, "by-hand")
    assert hand["task_key"] == f"task-{by_hand.id}" and hand["extra"] == [CARRIER]
    assert f"task {by_hand.id} (tests.testapp.django_tasks.observe_child) has a {CARRIER}" in output
    for label, result in cases.items():
        assert seen(tmp_path, label)["task_key"] is None, label
        assert f"task {result.id} (tests.testapp.django_tasks.observe_child)" in output, label
    assert "it does not verify (bad signature" in output
    assert "its identity is malformed or oversized" in output
    assert "malformed task carrier (str)" in output and "malformed task carrier (list)" in output


def test_an_argument_named_like_the_carrier_in_a_stored_task_grants_nothing(tmp_path):
    donor = child_of_job(jobs.observe_child, "donor", str(tmp_path))
    target = jobs.observe_any.enqueue("target", str(tmp_path))
    stored = DBTaskResult.objects.get(id=target.id)  # what an attacker with the table could do
    stored.args_kwargs["kwargs"][CARRIER] = carrier_of(donor)
    stored.save(update_fields=["args_kwargs"])
    output = db_worker()
    assert seen(tmp_path, "target")["task_key"] == f"task-{target.id}"  # its own, not the job's
    assert f"task {target.id} (tests.testapp.django_tasks.observe_any) has a {CARRIER}" in output


def test_with_the_trace_context_setting_a_root_carries_only_its_trace_context(tmp_path):
    on = {"OTEL_TASKCTX": {"DJANGO_TASKS_TRACE_CONTEXT": True}}
    with override_settings(**on):
        result = jobs.observe.enqueue("traced", str(tmp_path))
    carrier = carrier_of(result)
    assert carrier["traceparent"] and "taskctx=" not in carrier.get("baggage", "")
    db_worker(overrides=on)
    assert seen(tmp_path, "traced")["task_key"] == f"task-{result.id}"


def _long_task(tmp_path, refresh_interval: float) -> tuple[str, dict]:
    settings = {
        "OTEL_TASKCTX": {
            "SPAN_STORE": False,
            "LOCK_TTL": 2,
            "LOCK_REFRESH_INTERVAL": refresh_interval,
        }
    }
    result = jobs.hold_children.enqueue("long", [31, 32], str(tmp_path), seconds=4.5)
    db_worker(overrides=settings)
    assert DBTaskResult.objects.get(id=result.id).status == "SUCCESSFUL"
    return f"task-{result.id}", seen(tmp_path, "long")


def test_a_task_that_runs_past_the_lock_ttl_keeps_its_locks_to_the_end(tmp_path):
    key, long = _long_task(tmp_path, refresh_interval=0.4)
    assert long["registered"] and long["held"] == {"31": key, "32": key}  # after 2 TTLs
    assert holders([31, 32]) == {}  # released at its end


def test_control_without_refresh_the_locks_lapse_under_the_task(tmp_path):
    """Shows the test above can fail: with refreshing off, a 2 s TTL lapses mid-task."""
    key, long = _long_task(tmp_path, refresh_interval=0)
    assert long["registered"] and long["held"] == {}


class _CarriersElsewhere:
    """A router that sends every otel_taskctx model to another database."""

    def allow_migrate(self, db, app_label, model_name=None, **hints):
        return db == "other" if app_label == "otel_taskctx" else None


def test_a_router_that_keeps_carriers_away_from_the_task_rows_gets_a_warning():
    from django.core.checks import run_checks
    from django.test.utils import override_settings

    assert [m.id for m in run_checks() if m.id == "otel_taskctx.W061"] == []
    with override_settings(DATABASE_ROUTERS=[_CarriersElsewhere()]):
        found = [m for m in run_checks() if m.id == "otel_taskctx.W061"]
    assert len(found) == 1 and "'default'" in found[0].msg
