"""Celery jobs on a real worker: the identity in the ``otel_taskctx`` header, locks kept and
released at the job's end (success, failure, revoke), nested launches inline by default, the
helpers unchanged (docs/celery.md)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from otel_taskctx.task_manager import get_progress
from tests.testapp import celery_tasks as jobs
from tests.testapp.celery_tasks import holders

pytestmark = [pytest.mark.celery, pytest.mark.stack, pytest.mark.django_db(transaction=True)]


def seen(path: Path, label: str) -> dict:
    return json.loads((path / f"{label}.json").read_text())


def wait_until(condition, what: str, timeout: float = 60.0, worker=None):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if worker is not None and not worker.alive:
            raise AssertionError(f"the worker exited while waiting for {what}:\n{worker.tail()}")
        if time.monotonic() > deadline:
            tail = f":\n{worker.tail()}" if worker is not None else ""
            raise TimeoutError(f"{what} did not happen within {timeout}s{tail}")
        time.sleep(0.05)
    return value


def wait_seen(worker, path: Path, label: str) -> dict:
    wait_until(lambda: (path / f"{label}.json").exists(), f"{label}.json", worker=worker)
    return seen(path, label)


def test_a_root_job_runs_under_its_task_id_and_releases_its_locks(celery_worker, tmp_path):
    worker = celery_worker()
    result = jobs.hold.delay("root", [1, 2], str(tmp_path))
    got = wait_seen(worker, tmp_path, "root")
    key = f"celery-{result.id}"
    assert got["task_key"] == key and got["depth"] == 0 and got["registered"]
    assert got["held"] == {"1": key, "2": key} and got["skip_nested"]
    assert got["pid"] in worker.pool_pids()
    wait_until(lambda: holders([1, 2]) == {}, "the locks' release", worker=worker)
    assert get_progress(key) == "root: 2 children (50%)"


def test_a_failed_job_releases_its_locks(celery_worker, tmp_path):
    worker = celery_worker()
    result = jobs.hold.delay("failing", [3], str(tmp_path), fail=True)
    assert wait_seen(worker, tmp_path, "failing")["held"] == {"3": f"celery-{result.id}"}
    wait_until(lambda: "failed on purpose" in worker.log_text(), "the failure", worker=worker)
    wait_until(lambda: holders([3]) == {}, "the locks' release", worker=worker)


def test_nested_launches_run_inline_under_the_jobs_key(celery_worker, tmp_path):
    worker = celery_worker()
    path = str(tmp_path)
    for how in ("delay", "send_task"):
        result = jobs.parent.delay(how, [4, 5], path, how=how)
        key = f"celery-{result.id}"
        child = wait_seen(worker, tmp_path, f"{how}-child")
        assert child["task_key"] == key and child["depth"] == 1 and child["root"] == key
        assert child["pid"] == seen(tmp_path, f"{how}-parent")["pid"]  # in the caller
        assert child["held"] == {"4": key, "5": key}
        after = wait_seen(worker, tmp_path, f"{how}-after")
        assert after["task_key"] == key and after["child_value"] == 2
        assert after["held"] == {"4": key, "5": key}  # the job's until the job ends
        wait_until(lambda: holders([4, 5]) == {}, "the locks' release", worker=worker)


def test_a_nested_failure_fails_the_caller(celery_worker, tmp_path):
    worker = celery_worker()
    result = jobs.parent.delay("inner", [6], str(tmp_path), fail=True)
    assert wait_seen(worker, tmp_path, "inner-child")["task_key"] == f"celery-{result.id}"
    wait_until(
        lambda: f"Task tests.testapp.celery_tasks.parent[{result.id}] raised" in worker.log_text(),
        "the parent's failure",
        worker=worker,
    )
    assert not (tmp_path / "inner-after.json").exists()
    wait_until(lambda: holders([6]) == {}, "the locks' release", worker=worker)


def test_allow_nested_async_enqueues_a_job_of_its_own(celery_worker, tmp_path):
    worker = celery_worker()
    result = jobs.parent.delay("detached", [7], str(tmp_path), how="enqueue")
    child = wait_seen(worker, tmp_path, "detached-child")
    assert child["task_key"].startswith("celery-") and child["depth"] == 0
    assert child["task_key"] != f"celery-{result.id}"
    wait_until(lambda: holders([7]) == {}, "the locks' release", worker=worker)


def test_send_task_of_an_unregistered_task_and_canvas_inside_a_job_fail_clearly(
    celery_worker, tmp_path
):
    worker = celery_worker()
    for how in ("unknown", "group", "link"):
        jobs.parent.delay(how, [8], str(tmp_path), how=how)
    wait_until(
        lambda: "NestedTaskNotRegistered" in worker.log_text(), "the lookup error", worker=worker
    )
    assert "no task of that name is registered in this process" in worker.log_text()
    for option in ("link", "group_id"):
        refused = f"CanvasInsideJob: cannot launch tests.testapp.celery_tasks.hold with {option}"
        wait_until(lambda r=refused: r in worker.log_text(), f"{option} refused", worker=worker)
    assert (
        not (tmp_path / "group-child.json").exists() and not (tmp_path / "link-child.json").exists()
    )


def test_canvas_outside_a_job_is_celerys(celery_worker, tmp_path):
    worker = celery_worker()
    jobs.hold.apply_async(
        ("first", [9], str(tmp_path)), link=jobs.observe.si("then", str(tmp_path))
    )
    first = wait_seen(worker, tmp_path, "first")
    assert first["task_key"] is None and not first["registered"]  # a plain Celery task
    then = wait_seen(worker, tmp_path, "then")  # published by Celery, as a job of its own
    assert then["depth"] == 0 and then["task_key"] != first["task_key"]
    assert "ignoring the task identity" not in worker.log_text()


def test_a_revoked_job_releases_its_locks(celery_worker, tmp_path):
    from tests.celery_app import app

    worker = celery_worker()
    result = jobs.hold.delay("revoked", [14], str(tmp_path), pause=True)
    wait_until(lambda: (tmp_path / "revoked-pause.reached").exists(), "the pause", worker=worker)
    assert holders([14]) == {"14": f"celery-{result.id}"}
    app.control.revoke(result.id, terminate=True)
    wait_until(lambda: holders([14]) == {}, "the revoked job's release", worker=worker)
    assert not (tmp_path / "revoked.json").exists()


def spans_named(worker, name: str) -> list[dict]:
    return [s for s in worker.spans() if s["name"] == name]


@pytest.mark.parametrize("otel", ["", "before", "after"])
def test_spans_compose_with_opentelemetry_instrumentation_celery(celery_worker, tmp_path, otel):
    """Without opentelemetry-instrumentation-celery the CONSUMER span is ours; with it
    (instrumented before or after otel_taskctx) its span gets the lineage, no second one."""
    worker = celery_worker(env={"TASKCTX_CELERY_OTEL": otel})
    result = jobs.parent.delay("spans", [15], str(tmp_path))
    key = f"celery-{result.id}"
    wait_seen(worker, tmp_path, "spans-after")
    name = (
        "run/tests.testapp.celery_tasks.parent"
        if otel
        else "process tests.testapp.celery_tasks.parent"
    )
    consumer = wait_until(lambda: spans_named(worker, name), "the consumer span", worker=worker)
    assert len(consumer) == 1
    attributes = consumer[0]["attributes"]
    assert attributes["taskctx.task_key"] == key
    # ours: the worker's node name; theirs maps the message's origin onto it at the end
    assert attributes["celery.hostname"].startswith("taskctx-" if not otel else "")
    assert attributes["taskctx.worker"].startswith("taskctx-")  # the worker badge's, either way
    assert consumer[0]["kind"] == "SpanKind.CONSUMER"
    others = {"process tests.testapp.celery_tasks.parent", "run/tests.testapp.celery_tasks.parent"}
    assert not spans_named(worker, (others - {name}).pop())  # no second set
    inline = wait_until(
        lambda: spans_named(worker, "tests.testapp.celery_tasks.hold"),
        "the inline span",
        worker=worker,
    )
    assert inline[0]["parent_id"] == consumer[0]["context"]["span_id"]
    assert inline[0]["attributes"]["taskctx.nested.mode"] == "inline"


@pytest.mark.parametrize("refresh", [0.4, 0])
def test_a_job_that_runs_past_the_lock_ttl_keeps_its_locks_to_the_end(
    celery_worker, tmp_path, refresh
):
    """Its locks are refreshed while it runs; the control (refreshing off) shows the test can
    fail: a 2 s TTL lapses under a 4.5 s job."""
    ttl = {"OTEL_TASKCTX": {"LOCK_TTL": 2, "LOCK_REFRESH_INTERVAL": refresh}}
    worker = celery_worker(settings=ttl)
    result = jobs.hold.delay("long", [16, 17], str(tmp_path), seconds=4.5)
    key = f"celery-{result.id}"
    long = wait_seen(worker, tmp_path, "long")
    assert long["registered"]
    assert long["held"] == ({"16": key, "17": key} if refresh else {})  # after 2 TTLs
    wait_until(lambda: holders([16, 17]) == {}, "the locks' release", worker=worker)
