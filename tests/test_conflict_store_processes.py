"""Several worker processes registering descendants for one task, and racing tasks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from powercrud.async_manager import AsyncManager

from otel_taskctx.conflicts import get_conflict_store
from tests.conflict_caches import lock_keys_left, use_locks_cache, wipe

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True)]
ROOT = Path(__file__).resolve().parents[1]
CHILD = "testapp.child"

WORKER = """
import json, os, sys, time
import django
django.setup()
from powercrud.async_manager import AsyncManager
from otel_taskctx.conflicts import get_conflict_store
from otel_taskctx.errors import DescendantConflict
from tests.conflict_caches import use_locks_cache

job = json.loads(os.environ["STORE_TEST_JOB"])
with use_locks_cache(job["kind"], job["prefix"]):
    store = get_conflict_store(AsyncManager())
    store.batch_size = job.get("batch_size", store.batch_size)
    while time.time() < job["start_at"]:
        time.sleep(0.005)
    won, lost = [], 0
    for ids in job["calls"]:
        try:
            got = store.reserve(job["task"], {"testapp.child": ids})
        except DescendantConflict:
            lost += 1
            continue
        won += got.reserved.get("testapp.child", []) + got.already_held.get("testapp.child", [])
    print(json.dumps({"won": won, "lost": lost}))
"""


@pytest.fixture(params=["db", "redis"], ids=["database", "redis"])
def kind(request, settings):
    prefix = f"store-proc-{uuid.uuid4().hex[:8]}"
    with use_locks_cache(request.param, prefix):
        wipe(request.param)
        yield request.param, prefix
        wipe(request.param)


def run_workers(kind, prefix, jobs, settings):
    import time

    start_at = time.time() + 2.0  # every process has imported Django by then
    env = dict(
        os.environ,
        DJANGO_SETTINGS_MODULE="tests.settings",
        TASKCTX_DB_NAME=str(settings.DATABASES["default"]["NAME"]),
    )
    procs = []
    for job in jobs:
        job = dict(job, kind=kind, prefix=prefix, start_at=start_at)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER],
                cwd=ROOT,
                env=dict(env, STORE_TEST_JOB=json.dumps(job)),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_processes_registering_for_one_task_lose_no_tracking_entry(kind, settings):
    kind, prefix = kind
    jobs = [
        # every process also re-registers id 0 (re-entrant) and ids of its neighbour
        {
            "task": "job-p",
            "calls": [[0] + list(range(n * 100 + s * 20, n * 100 + s * 20 + 25)) for s in range(5)],
        }
        for n in range(3)
    ]
    results = run_workers(kind, prefix, jobs, settings)
    assert all(r["lost"] == 0 for r in results)
    manager = AsyncManager()
    store = get_conflict_store(manager)
    wanted = {i for job in jobs for call in job["calls"] for i in call}
    assert store.tracked_keys("job-p") == {f"powercrud:conflict:model:{CHILD}:{i}" for i in wanted}
    assert manager.check_conflict({CHILD: sorted(wanted)}) == wanted
    assert store.release("job-p") == len(wanted)
    assert lock_keys_left(kind, CHILD) == 0


def test_processes_racing_for_overlapping_ids_each_id_held_by_exactly_one(kind, settings):
    kind, prefix = kind
    calls = {
        "A": [list(range(s * 30, s * 30 + 80)) for s in range(6)],
        "B": [list(range(40 + s * 30, 40 + s * 30 + 80)) for s in range(6)],
    }
    jobs = [{"task": task, "calls": c, "batch_size": 30} for task, c in calls.items()]
    results = dict(zip(calls, run_workers(kind, prefix, jobs, settings), strict=True))
    won = {task: set(r["won"]) for task, r in results.items()}
    assert sum(r["lost"] for r in results.values()) >= 1  # the first calls overlap: one lost
    assert not (won["A"] & won["B"])
    store = get_conflict_store(AsyncManager())
    everything = {i for c in calls.values() for ids in c for i in ids}
    holders = store.holders({CHILD: everything}).get(CHILD, {})
    for task in calls:
        assert {i for i, h in holders.items() if h == task} == won[task]
        assert store.tracked_keys(task) == {
            f"powercrud:conflict:model:{CHILD}:{i}" for i in won[task]
        }
    store.release("A")
    store.release("B")
    assert lock_keys_left(kind, CHILD) == 0
