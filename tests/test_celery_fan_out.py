"""Fan-out on Celery, on a real worker with several processes: a ``@fan_out`` task launched
inside a job is a real child task under the job's key; the job completes after its last
child (its locks released then, ``job_completed`` sent, its result stored then where a
result backend exists); a failed or lost child fails the job (docs/celery.md)."""

from __future__ import annotations

import json
import os
import signal

import pytest
from celery.result import AsyncResult

from otel_taskctx.errors import FanOutChildFailed
from tests.celery_worker import result_backend
from tests.test_celery import seen, wait_seen, wait_until
from tests.testapp import celery_tasks as jobs
from tests.testapp.celery_tasks import holders

pytestmark = [pytest.mark.celery, pytest.mark.stack, pytest.mark.django_db(transaction=True)]


def start(celery_worker, tmp_path, backend: bool = True, settings_extra=None, **options):
    settings = {"CELERY_RESULT_BACKEND": result_backend(tmp_path / "results")} if backend else {}
    settings.update(settings_extra or {})
    env = {"TASKCTX_CELERY_MARKERS": str(tmp_path)}
    return celery_worker(concurrency=3, settings=settings, env=env, **options)


def completed(tmp_path, task_id: str) -> dict | None:
    path = tmp_path / f"completed-{task_id}.json"
    return json.loads(path.read_text()) if path.exists() else None


@pytest.fixture
def backend(tmp_path):
    """An app of this process that reads the worker's results (the same backend)."""
    from celery import Celery

    return Celery("results", backend=result_backend(tmp_path / "results"))


def test_the_job_completes_after_its_last_child(celery_worker, tmp_path, backend):
    worker = start(celery_worker, tmp_path)
    path = str(tmp_path)
    job = jobs.fan.delay("fan", [[41, 42], [43]], path, pause_part=0)
    key = f"celery-{job.id}"
    wait_until(
        lambda: (tmp_path / "fan-0-pause.reached").exists(), "child 0's pause", worker=worker
    )
    one = wait_seen(worker, tmp_path, "fan-1")
    parent = seen(tmp_path, "fan-parent")
    assert parent["task_key"] == key and parent["depth"] == 0
    assert (one["task_key"], one["depth"], one["root"]) == (key, 1, key)
    assert one["pid"] != parent["pid"] or one["pid"] in worker.pool_pids()
    assert one["held"] == {"43": key}
    # the job's function returned, a child still runs: the job is not over
    result = AsyncResult(job.id, app=backend)
    wait_until(lambda: result.state == "FAN_OUT_WAITING", "the job's waiting state", worker=worker)
    assert not result.ready() and completed(tmp_path, job.id) is None
    assert holders([41, 42, 43]) == {"41": key, "42": key, "43": key}

    (tmp_path / "fan-0-pause.go").write_text("")
    wait_until(lambda: completed(tmp_path, job.id), "the job's completion", worker=worker)
    assert completed(tmp_path, job.id) == {
        "sender": "tests.testapp.celery_tasks.fan",
        "task_key": key,
        "error": "",
        "pid": completed(tmp_path, job.id)["pid"],
    }
    assert holders([41, 42, 43]) == {}
    assert result.ready() and result.state == "SUCCESS" and result.get(timeout=5) == "fan"


def test_a_failed_child_fails_the_job(celery_worker, tmp_path, backend):
    worker = start(celery_worker, tmp_path)
    job = jobs.fan.delay("bad", [[44], [45]], str(tmp_path), fail_part=1)
    done = wait_until(lambda: completed(tmp_path, job.id), "the job's completion", worker=worker)
    assert "fan-out child tests.testapp.celery_tasks.part" in done["error"]
    assert "bad-1 failed on purpose" in done["error"]
    ended = f"Celery job {job.id} (tests.testapp.celery_tasks.fan) ended after its fanned-out"
    assert f"{ended} children: fan-out child" in worker.log_text()  # visibly, in the log
    result = AsyncResult(job.id, app=backend)
    wait_until(lambda: result.ready(), "the job's final state", worker=worker)
    assert result.state == "FAILURE" and isinstance(result.result, FanOutChildFailed)
    assert holders([44, 45]) == {}


def test_a_job_completes_after_its_children_without_a_result_backend(celery_worker, tmp_path):
    worker = start(celery_worker, tmp_path, backend=False)
    job = jobs.fan.delay("plain", [[46], [47]], str(tmp_path), pause_part=1, fail_self=True)
    key = f"celery-{job.id}"
    wait_until(
        lambda: (tmp_path / "plain-1-pause.reached").exists(), "child 1's pause", worker=worker
    )
    wait_seen(worker, tmp_path, "plain-0")
    wait_until(
        lambda: "failed after fanning out" in worker.log_text(),
        "the job's own failure",
        worker=worker,
    )
    assert completed(tmp_path, job.id) is None and holders([46, 47]) == {"46": key, "47": key}
    (tmp_path / "plain-1-pause.go").write_text("")
    done = wait_until(lambda: completed(tmp_path, job.id), "the job's completion", worker=worker)
    assert done["task_key"] == key and "failed after fanning out" in done["error"]
    assert holders([46, 47]) == {}


def test_a_child_killed_with_its_process_fails_the_job_and_leaves_no_lock(
    celery_worker, tmp_path, backend
):
    worker = start(celery_worker, tmp_path)
    job = jobs.fan.delay("lost", [[48], [49]], str(tmp_path), pause_part=0)
    key = f"celery-{job.id}"
    reached = tmp_path / "lost-0-pause.reached"
    wait_until(reached.exists, "child 0's pause", worker=worker)
    wait_seen(worker, tmp_path, "lost-1")
    assert holders([48, 49]) == {"48": key, "49": key}
    os.kill(int(reached.read_text()), signal.SIGKILL)  # its pool process, mid-task
    done = wait_until(lambda: completed(tmp_path, job.id), "the job's completion", worker=worker)
    assert "WorkerLostError" in done["error"]
    assert holders([48, 49]) == {}
    result = AsyncResult(job.id, app=backend)
    wait_until(lambda: result.ready(), "the job's final state", worker=worker)
    assert result.state == "FAILURE" and isinstance(result.result, FanOutChildFailed)


def test_a_child_lost_with_acks_late_is_delivered_again_and_the_job_ends(
    celery_worker, tmp_path, backend
):
    acks_late = {"CELERY_TASK_ACKS_LATE": True, "CELERY_TASK_REJECT_ON_WORKER_LOST": True}
    worker = start(celery_worker, tmp_path, settings_extra=acks_late)
    job = jobs.fan.delay("again", [[50], [51]], str(tmp_path), pause_part=0)
    key = f"celery-{job.id}"
    reached = tmp_path / "again-0-pause.reached"
    wait_until(reached.exists, "child 0's pause", worker=worker)
    wait_seen(worker, tmp_path, "again-1")
    os.kill(int(reached.read_text()), signal.SIGKILL)  # redelivered: it runs again, unpaused
    done = wait_until(lambda: completed(tmp_path, job.id), "the job's completion", worker=worker)
    assert done["error"] == "" and done["task_key"] == key
    assert seen(tmp_path, "again-0")["task_key"] == key  # the second delivery, same job
    assert holders([50, 51]) == {}
    result = AsyncResult(job.id, app=backend)
    wait_until(lambda: result.ready(), "the job's final state", worker=worker)
    assert result.state == "SUCCESS" and result.get(timeout=5) == "again"


def test_a_job_whose_whole_worker_died_is_failed_by_the_sweep(celery_worker, tmp_path):
    sweep = {"OTEL_TASKCTX": {"FAN_OUT_TIMEOUT": 3, "FAN_OUT_SWEEP_INTERVAL": 0.2}}
    worker = start(celery_worker, tmp_path, backend=False, settings_extra=sweep)
    job = jobs.fan.delay("gone", [[52], [53]], str(tmp_path), pause_part=0)
    key = f"celery-{job.id}"
    wait_until((tmp_path / "gone-0-pause.reached").exists, "child 0's pause", worker=worker)
    wait_seen(worker, tmp_path, "gone-1")
    assert holders([52, 53]) == {"52": key, "53": key}
    os.killpg(worker.pid, signal.SIGKILL)  # the whole worker: no process reports the child
    worker.proc.wait(10)
    assert completed(tmp_path, job.id) is None
    second = start(celery_worker, tmp_path, backend=False, settings_extra=sweep)
    done = wait_until(lambda: completed(tmp_path, job.id), "the sweep", worker=second)
    assert "no result within FAN_OUT_TIMEOUT" in done["error"]
    assert holders([52, 53]) == {}
