"""No silent lock loss on the caches Django ships: locks stay held, or locking is refused.

Django's own ``DatabaseCache`` at its defaults (``MAX_ENTRIES=300``) culls a third of its rows
whenever it grows past them. With ``otel_taskctx`` installed, powercrud's cache of that kind
keeps its locks in the lock table that is never culled; on caches that would lose locks for
certain (FileBasedCache, LocMem) otel_taskctx's own locking refuses with
``ConflictStoreUnavailable`` and the system checks warn.
"""

from __future__ import annotations

import time
import uuid

import pytest
from django.core.cache import caches
from django.core.cache.backends.db import DatabaseCache as DjangoDatabaseCache
from django.core.checks import run_checks
from django.test.utils import override_settings
from powercrud.async_manager import AsyncManager

from otel_taskctx import DescendantConflict, register_descendants, task_context
from otel_taskctx.cache import LockCache
from otel_taskctx.conflicts import get_conflict_store
from otel_taskctx.errors import ConflictStoreUnavailable
from tests.conflict_caches import ALIAS, cache_config, lock_keys_left, use_locks_cache, wipe
from tests.testapp.reliability import wait_for_file

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True)]
CHILD = "testapp.child"
MANAGER = "powercrud.async_manager.AsyncManager"


@pytest.fixture
def plain_db_cache():
    """powercrud's cache: Django's own DatabaseCache with default settings."""
    prefix = f"plain-{uuid.uuid4().hex[:8]}"
    override = use_locks_cache("plain-db", prefix)
    override.enable()
    wipe("plain-db")
    yield prefix
    wipe("plain-db")
    override.disable()


def unrelated_traffic(count: int) -> None:
    """The site writes keys of its own through Django's cache object (this culls)."""
    raw = caches[ALIAS]
    assert type(raw) is DjangoDatabaseCache
    for i in range(count):
        raw.set(f"unrelated:{uuid.uuid4().hex}:{i}", i)


def test_plain_databasecache_keeps_2000_descendant_locks(plain_db_cache):
    manager = AsyncManager()
    assert isinstance(manager.cache, LockCache)  # the view powercrud is given
    assert manager.cache.fallback is caches[ALIAS]  # other keys: Django's own cache object
    ids = list(range(1, 2001))
    with task_context("job-a", MANAGER):
        reg = register_descendants(CHILD, ids)
    assert reg and len(reg.reserved) == 2000
    unrelated_traffic(500)
    held = get_conflict_store(manager).holders({CHILD: ids})[CHILD]
    assert len(held) == 2000 and set(held.values()) == {"job-a"}
    assert manager.check_conflict({CHILD: ids}) == set(ids)  # powercrud sees every one
    with task_context("job-b", MANAGER), pytest.raises(DescendantConflict) as conflict:
        register_descendants(CHILD, [2000, 2001])
    assert conflict.value.holder_task_key == "job-a" and conflict.value.ids == [2000]
    assert manager.check_conflict({CHILD: [2001]}) == set()  # nothing new was reserved
    manager.remove_conflict_ids("job-a")  # what powercrud's completion hook calls
    assert lock_keys_left("plain-db", CHILD) == 0
    assert manager.check_conflict({CHILD: ids}) == set()


def test_unrelated_keys_are_culled_as_before(plain_db_cache):
    """Only lock keys move: the cache table still culls the site's own entries."""
    unrelated_traffic(400)
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT COUNT(*) FROM taskctx_cache WHERE cache_key LIKE %s", ["%unrel%"])
        assert cursor.fetchone()[0] <= 301


@pytest.mark.cluster
def test_powercrud_launch_locks_1000_parents_on_plain_databasecache(
    plain_db_cache, cluster_factory, tmp_path
):
    config = cache_config("plain-db", plain_db_cache)
    cluster_factory(
        settings={"CACHES": {ALIAS: config}, "POWERCRUD_SETTINGS": {"CACHE_NAME": ALIAS}}
    )
    manager = AsyncManager()
    ids = list(range(1, 1001))
    manager.launch_async_task(
        "tests.testapp.reliability.touch_children",
        ids,
        str(tmp_path),
        "parents",
        conflict_ids={CHILD: set(ids)},
    )
    wait_for_file(tmp_path / "parents.holding")  # the job runs, holding its launch locks
    unrelated_traffic(500)
    assert manager.check_conflict({CHILD: ids}) == set(ids)
    with pytest.raises(Exception, match="conflicts detected"):
        manager.launch_async_task(
            "tests.testapp.reliability.touch_children",
            [1000, 1001],
            str(tmp_path),
            "second",
            conflict_ids={CHILD: {1000, 1001}},
        )
    assert manager.check_conflict({CHILD: [1001]}) == set()
    (tmp_path / "parents.release").write_text("")
    deadline = time.monotonic() + 30
    while lock_keys_left("plain-db", CHILD) and time.monotonic() < deadline:
        time.sleep(0.1)  # the completion hook runs in the cluster's monitor
    assert lock_keys_left("plain-db", CHILD) == 0
    assert manager.check_conflict({CHILD: ids}) == set()


@pytest.mark.parametrize(
    ("backend", "reason"),
    [
        ("django.core.cache.backends.filebased.FileBasedCache", "random share of its files"),
        ("django.core.cache.backends.locmem.LocMemCache", "lives in one process"),
    ],
)
def test_our_locking_refuses_caches_that_lose_locks(backend, reason, tmp_path, settings):
    config = {"BACKEND": backend, "LOCATION": str(tmp_path / "cache")}
    with override_settings(
        CACHES={**settings.CACHES, ALIAS: config},
        POWERCRUD_SETTINGS={**settings.POWERCRUD_SETTINGS, "CACHE_NAME": ALIAS},
    ):
        with task_context("job-c", MANAGER), pytest.raises(ConflictStoreUnavailable) as exc:
            register_descendants(CHILD, [1, 2])
        message = str(exc.value)
        assert f"cache {ALIAS!r}" in message and reason in message
        assert "BACKEND'] = 'otel_taskctx.cache.DatabaseCache'" in message
        found = [m.id for m in run_checks(tags=["caches"]) if m.id.startswith("otel")]
        # a warning each (powercrud's own calls are powercrud's: tests/test_weak_caches.py)
        assert found == ["otel_taskctx.W030" if "filebased" in backend else "otel_taskctx.W004"]


def test_plain_databasecache_passes_the_checks(plain_db_cache):
    found = [m.id for m in run_checks(tags=["caches"]) if m.id.startswith("otel_taskctx.")]
    assert not [i for i in found if i.startswith(("otel_taskctx.E03", "otel_taskctx.W03"))]


def test_djangos_own_redis_cache_keeps_locks(settings):
    """Django's RedisCache does not cull: locks stay until released (generic store path)."""
    from tests.conflict_caches import REDIS_DB, REDIS_URL

    config = {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": f"{REDIS_URL}/{REDIS_DB}",
        "KEY_PREFIX": f"djredis-{uuid.uuid4().hex[:8]}",
    }
    with override_settings(
        CACHES={**settings.CACHES, ALIAS: config},
        POWERCRUD_SETTINGS={**settings.POWERCRUD_SETTINGS, "CACHE_NAME": ALIAS},
    ):
        manager = AsyncManager()
        ids = list(range(1, 2001))
        with task_context("job-r", MANAGER):
            assert register_descendants(CHILD, ids)
        for i in range(500):
            caches[ALIAS].set(f"unrelated:{i}", i)
        assert manager.check_conflict({CHILD: ids}) == set(ids)
        with task_context("job-s", MANAGER), pytest.raises(DescendantConflict):
            register_descendants(CHILD, [1])
        manager.remove_conflict_ids("job-r")
        assert manager.check_conflict({CHILD: ids}) == set()
        caches[ALIAS].delete_many([f"unrelated:{i}" for i in range(500)])
