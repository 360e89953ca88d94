"""Fault: two parent jobs with overlapping descendants, on two workers at the same moment.

The jobs meet at a barrier (each writes ``<label>.ready`` and waits for the other's), then both
run their nested step, which reserves its children (inline, all-or-nothing). The conflict
store is the cache of the stack: otel_taskctx's DatabaseCache embedded, Redis on the
production stack. While they run, the test samples every lock holder:

* at every sample, every descendant is held by at most one job, and it is always the same job
  (the loser's reservation never shows, not even in part);
* the loser fails with the conflict message naming the model, the contested ids and the
  holder; the winner updates its children once released;
* zero lock keys (and no tracking set) remain after both end.
"""

from __future__ import annotations

import json

import pytest
from django_q.models import Task
from powercrud.async_manager import AsyncManager

from tests.reliability import holders, lock_keys
from tests.testapp.models import Child, Parent

pytestmark = [pytest.mark.cluster, pytest.mark.stack, pytest.mark.django_db(transaction=True)]

HOLD = "tests.testapp.reliability.hold_children"
SIZE, OVERLAP = 120, 40


def test_overlapping_descendants_on_two_workers(cluster_factory, tmp_path, cache):
    cluster = cluster_factory(
        q_cluster={"workers": 2}, settings={"OTEL_TASKCTX": {"SPAN_STORE": False}}
    )
    parent = Parent.objects.create(name="shared")
    Child.objects.bulk_create(Child(parent=parent) for _ in range(2 * SIZE - OVERLAP))
    all_ids = list(Child.objects.order_by("pk").values_list("pk", flat=True))
    ids = {"a": all_ids[:SIZE], "b": all_ids[SIZE - OVERLAP :]}
    overlap = sorted(set(ids["a"]) & set(ids["b"]))
    assert len(overlap) == OVERLAP
    markers = tmp_path / "markers"
    markers.mkdir()
    manager = AsyncManager()
    keys = {
        label: manager.launch_async_task(HOLD, ids[label], str(markers), label, [other], timeout=60)
        for label, other in (("a", "b"), ("b", "a"))
    }
    label_of = {key: label for label, key in keys.items()}

    samples = []

    def sample():
        held = holders("testapp.child", all_ids)
        samples.append({k for k in held.values() if k is not None})
        return held

    def outcome():
        sample()
        done = list(Task.objects.filter(name__in=keys.values()))
        holding = [p for p in ("a", "b") if (markers / f"{p}.holding").exists()]
        if len(done) == 1 and holding and not done[0].success:
            return done[0], holding[0]
        return None

    loser_task, winner = cluster.wait_for(outcome, timeout=30, what="one job to win, one to lose")
    loser = label_of[loser_task.name]
    assert loser != winner

    # they really ran at the same time, on two workers
    pids = {json.loads((markers / f"{p}.ready").read_text())["pid"] for p in ("a", "b")}
    assert len(pids) == 2 and pids <= set(cluster.worker_pids())

    # the loser failed with the conflict message: model, the contested ids, the holder
    shown = ", ".join(sorted(map(str, overlap), key=str)[:20])
    expected = (
        f"task {keys[loser]} cannot reserve descendants: testapp.child ids [{shown} and "
        f"{OVERLAP - 20} more] are held by task {keys[winner]}"
    )
    assert expected in loser_task.result
    assert "DescendantConflict" in loser_task.result

    # while the winner holds: exactly its children, by it; the loser's own ids are free
    held = sample()
    assert {i for i, k in held.items() if k == keys[winner]} == set(ids[winner])
    assert {i for i, k in held.items() if k is not None} == set(ids[winner])
    assert not manager.cache.get(f"{manager.conflict_prefix}{keys[loser]}")

    (markers / f"{winner}.release").write_text("")
    task = cluster.wait_for(
        lambda: Task.objects.filter(name=keys[winner]).first(), what="the winner to finish"
    )
    assert task.success, task.result
    assert set(Child.objects.filter(pk__in=ids[winner]).values_list("status", flat=True)) == {
        winner
    }
    only_loser = set(ids[loser]) - set(ids[winner])
    assert set(Child.objects.filter(pk__in=only_loser).values_list("status", flat=True)) == {
        "draft"
    }
    cluster.wait_for(lambda: not lock_keys(), what="every lock key and tracking set to go")
    sample()

    # at every sample, at most one job held descendants, and only ever the winner
    assert len(samples) > 3
    assert all(s <= {keys[winner]} for s in samples), [s for s in samples if len(s) > 1]
