"""Fault: a worker SIGKILLed in the middle of a nested job (real qcluster, real services).

The job is a bulk edit of three parents; each parent's save path updates the parent and runs
its nested step (the children) inline, in one transaction. The job pauses in the nested step of
the second parent, after one child was saved, and the test kills the worker process there.

What must hold:

* no parent is left half-updated: the first parent and its children committed, the second
  parent's own update and its saved child rolled back with the process;
* django-q2 does what its broker promises: the ORM broker redelivers the package after
  ``retry`` seconds (the rerun, same task key, re-enters its own locks and succeeds); the Redis
  broker has no acknowledgements, so the job is lost and never reported;
* the dead job's locks do not stay forever: they carry a TTL, and powercrud's cleanup path
  (``pcrud_cleanup_async`` -> ``AsyncManager.cleanup_completed_tasks``) releases them; a new
  run then succeeds.
"""

from __future__ import annotations

import io
import os
import signal
import time

import pytest
from django.core.management import call_command
from django_q.models import OrmQ, Task
from powercrud.async_manager import AsyncManager

from tests.reliability import (
    APPROVE,
    holders,
    lock_keys,
    lock_ttls,
    process_alive,
    wait_for_file,
)
from tests.testapp.models import Child, Parent

pytestmark = [pytest.mark.cluster, pytest.mark.stack, pytest.mark.django_db(transaction=True)]

LOCK_TTL = 30  # seconds: descendant locks of a dead job expire this long after it died
CONFLICT_TTL = 30  # powercrud's own (parent) locks
RETRY = 4  # django-q2 redelivers an unacknowledged ORM package after this many seconds


@pytest.fixture
def ttl_settings(settings):
    settings.POWERCRUD_SETTINGS = {**settings.POWERCRUD_SETTINGS, "CONFLICT_TTL": CONFLICT_TTL}
    return {
        "OTEL_TASKCTX": {"SPAN_STORE": False, "LOCK_TTL": LOCK_TTL, "LOCK_REFRESH_INTERVAL": 10},
        "POWERCRUD_SETTINGS": {"CONFLICT_TTL": CONFLICT_TTL},
    }


def _family(parents: int, children: int) -> list[Parent]:
    out = []
    for n in range(parents):
        parent = Parent.objects.create(name=f"P{n + 1}")
        Child.objects.bulk_create(Child(parent=parent) for _ in range(children))
        out.append(parent)
    return out


def _state(parent: Parent) -> tuple[str, set[str]]:
    parent.refresh_from_db()
    return parent.status, set(parent.children.values_list("status", flat=True))


def _orm_broker() -> bool:
    from django_q.conf import Conf

    return bool(Conf.ORM)


def test_worker_killed_mid_nested_job(cluster_factory, tmp_path, ttl_settings, cache):
    cluster = cluster_factory(
        q_cluster={"workers": 1, "retry": RETRY, "timeout": RETRY - 1},
        settings=ttl_settings,
    )
    p1, p2, p3 = _family(3, 4)
    ids = [p1.pk, p2.pk, p3.pk]
    markers = tmp_path / "markers"
    markers.mkdir()
    manager = AsyncManager()
    key = manager.launch_async_task(
        APPROVE,
        ids,
        marker_dir=str(markers),
        pause_at=f"mid-{p2.pk}",
        conflict_ids={"testapp.parent": set(ids)},
        timeout=RETRY - 1,
    )

    pid = int(wait_for_file(markers / f"mid-{p2.pk}.reached", cluster))
    assert pid in cluster.worker_pids()
    assert "qcluster" in open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
    # mid-step, what other processes see: the first parent complete, the second not yet
    assert _state(p1) == ("approved", {"approved"})
    assert _state(p2) == ("draft", {"draft"})
    assert set(holders("testapp.parent", ids).values()) == {key}
    assert set(holders("testapp.child", p1.children.values_list("pk", flat=True)).values()) == {key}

    os.kill(pid, signal.SIGKILL)
    cluster.wait_for(lambda: not process_alive(pid), what="the worker to die")
    cluster.wait_for(
        lambda: "reincarnated worker" in cluster.log_text(), what="the sentinel to notice"
    )

    # nothing half-updated: the second parent's update and its saved child died together
    assert _state(p1) == ("approved", {"approved"})
    assert _state(p2) == ("draft", {"draft"})
    assert _state(p3) == ("draft", {"draft"})
    # the dead job's locks carry a TTL (they cannot outlive it by more than that)
    ttls = lock_ttls()
    assert ttls and all(
        t is not None and 0 < t <= max(LOCK_TTL, CONFLICT_TTL) for t in ttls.values()
    )

    if _orm_broker():
        # the ORM broker redelivers the unacknowledged package: the rerun (same task key)
        # re-enters its own locks, passes the marker and completes the bulk edit
        task = cluster.wait_for(
            lambda: Task.objects.filter(name=key).first(), timeout=RETRY + 30, what="the rerun"
        )
        assert task.success, task.result
        assert task.attempt_count == 1
        assert task.result["done"] == ids
        assert task.result["seen"]["task_key"] == key
        assert task.result["seen"]["pid"] != pid
    else:
        # the Redis broker popped the package: nobody will ever report this job
        time.sleep(RETRY)
        assert not Task.objects.filter(name=key).exists()
        assert key in manager.get_active_tasks()
        assert lock_keys()  # still locked, by a job that no longer exists
        out = io.StringIO()
        call_command("pcrud_cleanup_async", stdout=out)
        assert f"{key} (django-q2 task missing)" in out.getvalue()
        assert lock_keys() == {}
        # a rerun (a new job) succeeds
        key = manager.launch_async_task(APPROVE, ids, conflict_ids={"testapp.parent": set(ids)})
        task = cluster.wait_for(lambda: Task.objects.filter(name=key).first(), what="the rerun")
        assert task.success, task.result

    for parent in (p1, p2, p3):
        assert _state(parent) == ("approved", {"approved"})
    cluster.wait_for(lambda: not lock_keys(), what="the completion hook to release every lock")
    cluster.wait_for(lambda: not OrmQ.objects.exists() if _orm_broker() else True, what="the ack")
