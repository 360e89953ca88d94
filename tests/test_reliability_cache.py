"""Fault: the cache (Redis) that holds the locks goes away while a job runs.

The locks live in a private ``redis-server`` (alias ``faulty``, powercrud's ``CACHE_NAME``) for
both this process and the qcluster. The job pauses in the first parent's save path after the
parent's own update, before its descendants are registered; the test kills the Redis server
and lets the job go on. The reservation cannot be made, so:

* the parent job fails, visibly: django-q2 records the failure with the
  ``ConflictStoreUnavailable`` message, and the job's CONSUMER span is an error;
* nothing proceeds unlocked: no child is modified, the parent's own update rolled back with
  it, the other parents were never reached.
"""

from __future__ import annotations

import pytest
from django_q.models import Task
from powercrud.async_manager import AsyncManager

from tests.reliability import APPROVE, RedisServer, wait_for_file
from tests.testapp.models import Child, Parent

pytestmark = [pytest.mark.cluster, pytest.mark.stack, pytest.mark.django_db(transaction=True)]

ALIAS = "faulty"


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis")
    yield server
    server.kill()


def test_cache_down_before_descendants_are_registered(
    cluster_factory, settings, redis_server, tmp_path
):
    cache_settings = {
        "CACHES": {ALIAS: redis_server.cache_config()},
        "POWERCRUD_SETTINGS": {"CACHE_NAME": ALIAS},
        "OTEL_TASKCTX": {"SPAN_STORE": False},
    }
    cluster = cluster_factory(settings=cache_settings)
    settings.CACHES = {**settings.CACHES, ALIAS: redis_server.cache_config()}
    settings.POWERCRUD_SETTINGS = {**settings.POWERCRUD_SETTINGS, "CACHE_NAME": ALIAS}

    parents = []
    for n in range(2):
        parent = Parent.objects.create(name=f"P{n + 1}")
        Child.objects.bulk_create(Child(parent=parent) for _ in range(3))
        parents.append(parent)
    ids = [p.pk for p in parents]
    markers = tmp_path / "markers"
    markers.mkdir()
    manager = AsyncManager()
    assert manager.cache_name == ALIAS
    key = manager.launch_async_task(
        APPROVE,
        ids,
        marker_dir=str(markers),
        pause_at=f"before-{ids[0]}",
        conflict_ids={"testapp.parent": set(ids)},
    )
    wait_for_file(markers / f"before-{ids[0]}.reached", cluster)
    assert manager.cache.get(f"{manager.conflict_model_prefix}testapp.parent:{ids[0]}") == key

    redis_server.kill()
    (markers / f"before-{ids[0]}.go").write_text("")

    task = cluster.wait_for(lambda: Task.objects.filter(name=key).first(), what=f"task {key}")
    assert task.success is False
    message = str(task.result)
    assert f"could not reserve descendants for task {key}" in message
    assert "otel_taskctx.errors.ConflictStoreUnavailable" in message
    assert "connect" in message.lower()  # the cause is named too

    # nothing proceeded unlocked: no child touched, the parent's own update rolled back
    assert set(Child.objects.values_list("status", flat=True)) == {"draft"}
    assert set(Parent.objects.values_list("status", flat=True)) == {"draft"}

    def consumer():
        return [
            s
            for s in cluster.spans()
            if s["kind"] == "SpanKind.CONSUMER"
            and s["attributes"].get("django_q2.task.name") == key
        ]

    cluster.wait_for(consumer, what="the job's consumer span")
    (span,) = consumer()
    assert span["status"]["status_code"] == "ERROR"
    assert span["attributes"]["error.type"] == "ConflictStoreUnavailable"
    assert cluster.alive
