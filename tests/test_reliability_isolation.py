"""Context isolation under load: 1,000 mixed jobs through a 2-worker cluster.

Jobs launched by a powercrud manager (some launching a nested step inline, some failing),
plain ``async_task`` jobs and failing jobs are interleaved, so every worker process runs jobs
of every kind back to back. Each job records what ``current_task()`` (and powercrud's own
``get_current_task()``) returned at its start, after its work, and in its nested step: in its
result, or in its error message when it fails. No job may ever see another job's identity,
and a plain job must never see one at all.
"""

from __future__ import annotations

import json
import os
import time

import pytest
from django_q.models import Task
from django_q.tasks import async_task
from powercrud.async_manager import AsyncManager

pytestmark = [pytest.mark.cluster, pytest.mark.stack, pytest.mark.django_db(transaction=True)]

OBSERVE = "tests.testapp.reliability.observe"
JOBS = int(os.environ.get("TASKCTX_ISOLATION_JOBS", "1000"))
# kinds, in a repeating pattern: manager job, plain job, manager job with a nested step,
# plain job, failing manager job, failing plain job, failing manager job with a nested step
PATTERN = ["managed", "plain", "nested", "plain", "fail", "plain-fail", "fail-nested"]


def _launch(manager: AsyncManager, n: int) -> tuple[str, str, str]:
    kind = PATTERN[n % len(PATTERN)]
    label = f"{kind}-{n}"
    fail = "fail" in kind
    nested = "nested" in kind
    if kind.startswith("plain"):
        name = f"plain-{n}"
        async_task(OBSERVE, label, fail=fail, task_name=name)
    else:
        name = manager.launch_async_task(OBSERVE, label, fail=fail, nested=nested)
    return kind, label, name


def _observed(task: Task) -> dict:
    if task.success:
        return task.result
    text = str(task.result)
    assert text.startswith("observed "), text[:300]
    value, _ = json.JSONDecoder().raw_decode(text[len("observed ") :])
    return value


def test_no_job_sees_another_jobs_identity(cluster_factory, cache):
    cluster = cluster_factory(
        # keep every result (django-q2 keeps 250 successes by default), acknowledge failures
        # (the ORM broker would redeliver them after ``retry``)
        q_cluster={"workers": 2, "poll": 0.05, "save_limit": 0, "ack_failures": True},
        settings={"OTEL_TASKCTX": {"SPAN_STORE": False}},
    )
    manager = AsyncManager()
    started = time.monotonic()
    jobs = [_launch(manager, n) for n in range(JOBS)]
    enqueued = time.monotonic() - started
    names = [name for _, _, name in jobs]
    cluster.wait_for(
        lambda: Task.objects.filter(name__in=names).count() == JOBS,
        timeout=max(120, JOBS / 5),
        interval=0.25,
        what=f"{JOBS} jobs",
    )
    elapsed = time.monotonic() - started
    tasks = {t.name: t for t in Task.objects.filter(name__in=names)}

    escapes = []
    pids = set()
    counts: dict[str, int] = {}
    for kind, label, name in jobs:
        task = tasks[name]
        counts[kind] = counts.get(kind, 0) + 1
        assert task.success is ("fail" not in kind), (label, task.result)
        seen = _observed(task)
        assert seen["label"] == label
        views = [seen["seen"], seen["after"], *seen.get("nested", [])]
        pids.add(seen["seen"]["pid"])
        expected = None if kind.startswith("plain") else name
        for view in views:
            if view["task_key"] != expected or view["powercrud_task"] != expected:
                escapes.append((label, name, view))
            if expected is None and "taskctx" in view["baggage"]:
                escapes.append((label, name, view))
        if expected is not None:
            assert seen["kwarg"] == name
        if "nested" in kind:
            (step,) = seen["nested"]
            assert (step["depth"], step["root"], step["task_key_kwarg"]) == (1, name, name)
            assert seen["seen"]["depth"] == 0
    assert escapes == [], f"{len(escapes)} escapes, first: {escapes[:3]}"
    assert set(counts) == set(PATTERN)
    assert len(pids) >= 2, "both workers ran jobs"
    print(f"\n{JOBS} jobs in {elapsed:.1f}s (enqueued in {enqueued:.1f}s); per kind: {counts}")
