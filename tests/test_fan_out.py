"""Fan-out: nested jobs run in parallel on other workers; the parent ends after the last one.

A real qcluster runs a parent job (launched by powercrud's AsyncManager) whose nested launches
are listed in ``OTEL_TASKCTX["FAN_OUT"]``: each becomes a child job on another worker, and
powercrud's completion of the parent (lock release, progress end) waits for all of them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from django.test.utils import override_settings
from django_q.models import Task
from opentelemetry.instrumentation.taskctx import barrier
from powercrud.async_manager import AsyncManager

from otel_taskctx import task_context
from otel_taskctx.errors import FanOutUnavailable
from tests.testapp.fan_out import CHILD, INLINE_CHILD, MARKED_CHILD

pytestmark = [pytest.mark.stack, pytest.mark.cluster, pytest.mark.django_db(transaction=True)]
PARENT = "tests.testapp.fan_out.fan_parent"
FAN_OUT = {"OTEL_TASKCTX": {"FAN_OUT": [CHILD]}}


def read(marker_dir: Path, name: str) -> dict | None:
    path = marker_dir / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def wait_for_completion(manager: AsyncManager, key: str, timeout: float = 60.0) -> float:
    """Until powercrud's completion hook removed the job's progress key; when that was."""
    deadline = time.monotonic() + timeout
    while manager.get_progress(key) is not None:
        assert time.monotonic() < deadline, f"job {key} never completed"
        time.sleep(0.02)
    return time.time()


def locks_of(manager: AsyncManager, ids: list[int]) -> dict:
    return manager.check_conflict({"testapp.child": ids})


@pytest.mark.parametrize("workers", [3, 1])
def test_children_run_on_other_workers_and_the_parent_ends_after_the_last(
    cluster_factory, tmp_path, cache, workers
):
    cluster = cluster_factory(q_cluster={"workers": workers}, settings=FAN_OUT)
    groups = [[1, 2], [3, 4], [5, 6]]
    manager = AsyncManager()
    key = manager.launch_async_task(PARENT, "p", groups, str(tmp_path), 0.6)
    completed_at = wait_for_completion(manager, key)

    children = [read(tmp_path, f"p-{n}") for n in range(3)]
    parent = read(tmp_path, "p-parent")
    assert parent is not None and all(children), "every child and the parent ran"
    last_end = max(c["end"] for c in children)
    assert completed_at >= last_end  # powercrud's completion came after the last child
    assert parent["ended"] < last_end  # the parent's function did not wait for them
    for n, child in enumerate(children):
        # under the parent's key, one level deeper, holding its own descendants
        assert (child["task_key"], child["depth"], child["task_key_kwarg"]) == (key, 1, key)
        assert child["held"] == {str(i): key for i in groups[n]}
        assert child["pid"] in cluster.worker_pids()
    if workers > 1:
        assert len({c["pid"] for c in children}) >= 2  # other workers
        starts = sorted(c["start"] for c in children)
        assert starts[1] < min(c["end"] for c in children)  # siblings overlapped
    assert Task.objects.get(name=key).success is True
    assert locks_of(manager, [i for g in groups for i in g]) == set()
    assert not barrier.has_children(key)  # the barrier forgot the job
    # only a job that fanned out asks the barrier: its worker gave it the fan-out job hook;
    # a job that fanned nothing out keeps powercrud's own
    from opentelemetry.instrumentation.taskctx.fan_out import JOB_HOOK, POWERCRUD_HOOK

    assert Task.objects.get(name=key).hook == JOB_HOOK
    plain = manager.launch_async_task(CHILD, "plain", [9], str(tmp_path), 0)
    wait_for_completion(manager, plain)
    assert Task.objects.get(name=plain).hook == POWERCRUD_HOOK

    # the job's tree holds every child's run, with the worker that ran it
    from otel_taskctx.spans import flush_span_store
    from otel_taskctx.spans.queries import load_tree

    flush_span_store()
    deadline = time.monotonic() + 20
    while True:
        tree = load_tree(key)
        runs = (
            [n for n in tree.job_nodes if n.kind == "CONSUMER" and CHILD in n.name] if tree else []
        )
        if len(runs) == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(runs) == 3 and all(n.process for n in runs)
    assert {n.attributes.get("taskctx.root_task_key") for n in runs} == {key}
    if workers > 1:
        assert len({n.process for n in runs}) >= 2


def test_fan_out_needs_no_recorded_span(cluster_factory, tmp_path, cache):
    """The barrier, locks and lineage ride on the signed identity, not on spans: a cluster
    whose sampler drops every span fans out the same way."""
    cluster_factory(
        q_cluster={"workers": 2}, settings=FAN_OUT, env={"OTEL_TRACES_SAMPLER": "always_off"}
    )
    manager = AsyncManager()
    key = manager.launch_async_task(PARENT, "n", [[61], [62]], str(tmp_path), 0.4)
    completed_at = wait_for_completion(manager, key)
    children, parent = [read(tmp_path, f"n-{i}") for i in range(2)], read(tmp_path, "n-parent")
    assert parent and all(children)
    assert {(c["task_key"], c["depth"]) for c in children} == {(key, 1)}
    assert [c["held"] for c in children] == [{"61": key}, {"62": key}]
    assert parent["ended"] < max(c["end"] for c in children) <= completed_at
    assert Task.objects.get(name=key).success is True
    assert locks_of(manager, [61, 62]) == set() and not barrier.has_children(key)
    from otel_taskctx.models import TaskSpan

    time.sleep(1.5)  # the workers' span writers would have stored their runs by now
    assert not TaskSpan.objects.filter(root_task_key=key, kind="CONSUMER").exists()


def test_a_failed_child_fails_the_parent_with_its_error(cluster_factory, tmp_path, cache):
    cluster_factory(q_cluster={"workers": 2}, settings=FAN_OUT)
    groups = [[11], [12], [13]]
    manager = AsyncManager()
    key = manager.launch_async_task(PARENT, "f", groups, str(tmp_path), 0.3, fail_child=1)
    wait_for_completion(manager, key)
    task = Task.objects.get(name=key)
    assert task.success is False
    assert f"fan-out child {CHILD}" in task.result
    assert "ValueError: f-1 failed on purpose" in task.result
    assert read(tmp_path, "f-0") and read(tmp_path, "f-2")  # the siblings still ran
    assert locks_of(manager, [11, 12, 13]) == set()


def test_fan_out_with_a_sync_launch_is_refused(cache):
    manager = AsyncManager()
    with override_settings(OTEL_TASKCTX={"FAN_OUT": [CHILD]}):
        with task_context("job-sync", "powercrud.async_manager.AsyncManager"):
            with pytest.raises(FanOutUnavailable, match="synchronously"):
                manager.launch_async_task(CHILD, "s", [21], "/tmp", 0, sync=True)
    assert not barrier.has_children("job-sync")


def test_the_checks_refuse_fan_out_on_a_sync_broker(settings):
    from django.core.checks import run_checks

    def ids():
        return [m.id for m in run_checks() if m.id in ("otel_taskctx.E070", "otel_taskctx.E071")]

    assert ids() == []
    with override_settings(
        OTEL_TASKCTX={"FAN_OUT": [CHILD]}, Q_CLUSTER={**settings.Q_CLUSTER, "sync": True}
    ):
        assert ids() == ["otel_taskctx.E070"]
    with override_settings(OTEL_TASKCTX={"NESTED_POLICY": "fan_out"}):
        assert ids() == []
    with override_settings(OTEL_TASKCTX={"NESTED_POLICY": "parallel"}):
        assert ids() == ["otel_taskctx.E071"]


def test_a_worker_killed_under_a_child_never_leaves_the_job_running(
    cluster_factory, tmp_path, cache
):
    import os
    import signal

    from django_q.conf import Conf

    from tests.testapp.reliability import wait_for_file

    retry, fan_out_timeout = 4, 10
    fan_out = {"FAN_OUT": [CHILD], "FAN_OUT_TIMEOUT": fan_out_timeout, "FAN_OUT_SWEEP_INTERVAL": 1}
    cluster_factory(
        q_cluster={"workers": 2, "retry": retry, "timeout": retry - 1},
        settings={"OTEL_TASKCTX": fan_out},
    )
    manager = AsyncManager()
    key = manager.launch_async_task(PARENT, "k", [[31], [32]], str(tmp_path), 0.2, pause_child=0)
    reached = tmp_path / "k-0-pause.reached"
    wait_for_file(reached)
    os.kill(int(reached.read_text()), signal.SIGKILL)  # the worker running child 0
    (tmp_path / "k-0-pause.go").write_text("")
    wait_for_file(tmp_path / "k-1.json")  # the sibling finished on the other worker
    if Conf.ORM:  # the ORM broker delivers the child again after `retry` seconds
        wait_for_completion(manager, key, timeout=retry + 30)
        assert Task.objects.get(name=key).success is True
        assert read(tmp_path, "k-0") is not None  # the rerun finished the child
    else:  # Redis: no redelivery; the cluster fails the job by itself after FAN_OUT_TIMEOUT
        assert manager.get_progress(key) is not None  # still waiting for the lost child
        # no taskctx_sweep, no cron, no other job: the sweep interval is 1 s
        wait_for_completion(manager, key, timeout=fan_out_timeout + 1 + 20)
        task = Task.objects.get(name=key)
        assert task.success is False and "no result within FAN_OUT_TIMEOUT" in task.result
    assert locks_of(manager, [31, 32]) == set()
    assert not barrier.has_children(key)  # the barrier forgot the job


def test_children_launched_in_a_transaction_see_what_it_committed(cluster_factory, tmp_path, cache):
    from tests.testapp.models import Parent

    cluster_factory(q_cluster={"workers": 2}, settings=FAN_OUT)
    parent = Parent.objects.create(name="P", status="draft")
    manager = AsyncManager()
    key = manager.launch_async_task(
        PARENT, "t", [[41], [42]], str(tmp_path), 0.1, parent_id=parent.pk
    )
    wait_for_completion(manager, key)
    children = [read(tmp_path, f"t-{n}") for n in range(2)]
    assert all(children) and {c["parent_status"] for c in children} == {"approved"}
    assert Task.objects.get(name=key).success is True
    assert locks_of(manager, [41, 42]) == set()


def test_nested_fan_out_progress_false_results_and_busy_workers(cluster_factory, tmp_path, cache):
    """Two parents keep both workers busy; a child fans out a grandchild (the barrier is
    transitive) and reports progress under the job's key; a child returning False fails its
    job; the other job succeeds."""
    cluster_factory(q_cluster={"workers": 2}, settings=FAN_OUT)
    manager = AsyncManager()
    options = {0: {"grandchild": [73]}, 1: {"return_false": True}}
    first = manager.launch_async_task(
        PARENT, "a", [[71], [72]], str(tmp_path), 0.5, child_options=options
    )
    second = manager.launch_async_task(PARENT, "b", [[81], [82]], str(tmp_path), 0.5)
    seen_progress = set()
    deadline = time.monotonic() + 60
    while manager.get_progress(first) is not None or manager.get_progress(second) is not None:
        seen_progress.add(manager.get_progress(first))
        assert time.monotonic() < deadline, "the jobs never completed"
        time.sleep(0.02)
    completed_at = time.time()
    grand = read(tmp_path, "a-0-grand")
    assert grand is not None and (grand["task_key"], grand["depth"]) == (first, 2)
    assert completed_at >= grand["end"]  # the job waited for its grandchild too
    # the children's progress, under the job's key
    assert {m for m in seen_progress if m and m.startswith("child a-")}
    failed = Task.objects.get(name=first)
    assert failed.success is False and "the child returned False" in failed.result
    assert Task.objects.get(name=second).success is True
    assert locks_of(manager, [71, 72, 73, 81, 82]) == set()


def test_a_conflicting_fan_out_launch_enqueues_nothing(cache):
    from django_q.brokers import get_broker

    from otel_taskctx import DescendantConflict, get_conflict_store

    manager = AsyncManager()
    get_conflict_store(manager).reserve("someone-else", {"testapp.child": [91]})
    broker = get_broker()
    queued = broker.queue_size()
    with override_settings(OTEL_TASKCTX={"FAN_OUT": [CHILD]}):
        with task_context("job-c", "powercrud.async_manager.AsyncManager"):
            with pytest.raises(DescendantConflict) as conflict:
                manager.launch_async_task(
                    CHILD, "c", [90, 91], "/tmp", 0, conflict_ids={"testapp.child": {90, 91}}
                )
    assert conflict.value.holder_task_key == "someone-else"
    assert broker.queue_size() == queued  # nothing was enqueued
    assert not barrier.has_children("job-c")
    assert locks_of(manager, [90]) == set()  # and nothing new was reserved
    get_conflict_store(manager).release("someone-else")


@pytest.mark.parametrize(
    ("child", "settings", "fanned_out"),
    [
        (MARKED_CHILD, {}, True),
        (INLINE_CHILD, {"OTEL_TASKCTX": {"NESTED_POLICY": "fan_out"}}, False),
    ],
)
def test_the_functions_decorator_chooses_over_the_settings(
    cluster_factory, tmp_path, cache, child, settings, fanned_out
):
    cluster_factory(q_cluster={"workers": 2}, settings=settings)
    manager = AsyncManager()
    key = manager.launch_async_task(PARENT, "d", [[51], [52]], str(tmp_path), 0.3, child=child)
    completed_at = wait_for_completion(manager, key)
    children, parent = [read(tmp_path, f"d-{n}") for n in range(2)], read(tmp_path, "d-parent")
    assert parent and all(children)
    assert {(c["task_key"], c["depth"]) for c in children} == {(key, 1)}
    last_end = max(c["end"] for c in children)
    assert completed_at >= last_end
    if fanned_out:  # the parent's function ended first: its children were jobs of their own
        assert parent["ended"] < last_end
    else:  # inline: in the parent's worker, before the parent's function ended
        assert parent["ended"] > last_end and {c["pid"] for c in children} == {parent["pid"]}
    assert Task.objects.get(name=key).success is True
    assert locks_of(manager, [51, 52]) == set()


def _plain() -> None: ...


def _under() -> None: ...


def _over() -> None: ...


def test_decorators_mark_functions_and_django_tasks_either_way_round():
    from django.tasks import task

    from otel_taskctx import fan_out, run_inline
    from otel_taskctx.identity import TaskIdentity
    from otel_taskctx.policy import ENQUEUE, FAN_OUT, INLINE, nested_launch

    job = TaskIdentity("job-1")

    def wanted(func):
        return nested_launch(job, func) == FAN_OUT

    assert not wanted(_plain)
    assert fan_out(_plain) is _plain and wanted(_plain)
    below, above = task(fan_out(_under)), fan_out(task(_over))
    assert wanted(below.func) and wanted(above.func)
    assert wanted(MARKED_CHILD) and not wanted(CHILD)  # dotted paths too
    with override_settings(OTEL_TASKCTX={"NESTED_POLICY": "fan_out"}):
        assert wanted(CHILD) and not wanted(INLINE_CHILD)
        assert not wanted(run_inline(_plain))
    # the one decision, in order: outside a task, ENQUEUE_NESTED, the decorator, the settings
    assert nested_launch(None, MARKED_CHILD) == ENQUEUE
    with override_settings(OTEL_TASKCTX={"ENQUEUE_NESTED": [MARKED_CHILD], "FAN_OUT": [CHILD]}):
        assert nested_launch(job, MARKED_CHILD) == ENQUEUE
        assert nested_launch(job, CHILD) == FAN_OUT
        assert nested_launch(job, INLINE_CHILD) == INLINE


def test_a_childs_name_carries_its_job_key_and_long_keys_still_find_their_job(cache, monkeypatch):
    from django.conf import settings

    # the barrier lives beside the locks: Redis on the Redis stack, else the database
    assert isinstance(barrier.store(), barrier.RedisBarrier) == (settings.STACK == "redis-postgres")
    completed = []
    monkeypatch.setattr(barrier, "complete", lambda *a: completed.append(a))
    for job in ("3f2b9c1e-6c7a-4e50-b362-b742dfa2eee8", "k" * 150):
        assert not barrier.job_ended(job, PARENT)  # no child: the caller completes it
        names = [barrier.child_name(job) for _ in range(3)]
        assert len(set(names)) == 3 and all(len(n) <= 64 for n in names)
        assert all((job in n) == (len(job) < 40) for n in names)
        for name in names:
            barrier.add_child(job, name, CHILD)
        barrier.remove_child(job, names.pop())  # its enqueue failed
        assert barrier.has_children(job)
        assert barrier.job_ended(job, PARENT)  # deferred: two children pending
        assert barrier.child_ended(names[0], "") == job
        assert not completed  # one child still pending
        assert barrier.child_ended(names[1], "ValueError: no") == job
        ((key, record, failed),) = completed
        assert key == job and record.func == PARENT
        assert [(r.task_id, r.error) for r in failed] == [(names[1], "ValueError: no")]
        assert not barrier.has_children(job)
        assert barrier.child_ended(names[1], "") is None  # forgotten with its job
        completed.clear()
    assert barrier.child_ended(barrier.child_name("gone"), "") is None  # no record


@pytest.mark.django_db
def test_hook_paths_stored_by_earlier_versions_still_resolve_and_run(cache, monkeypatch):
    """django-q2 ``Task`` rows queued before the rename store ``…taskctx._fan_out.*``:
    saving such a row runs its hook through django-q2's own ``call_hook``."""
    from django.utils import timezone

    ended, completed = [], []
    monkeypatch.setattr(barrier, "child_ended", lambda *a: ended.append(a))
    monkeypatch.setattr(barrier, "job_ended", lambda *a: completed.append(a) or True)
    old = "opentelemetry.instrumentation.taskctx._fan_out"
    now = timezone.now()
    for n, (hook, name) in enumerate((("child_done", "fan-out-old"), ("job_done", "job-old"))):
        Task.objects.create(
            id=f"old{n}",
            name=name,
            func=CHILD,
            hook=f"{old}.{hook}",
            started=now,
            stopped=now,
            success=True,
            result=1,
        )
    assert ended == [("fan-out-old", "", CHILD)]
    assert completed == [("job-old", CHILD)]
