"""Storage that evicts locks: Django's culling DatabaseCache, Redis maxmemory policies,
Memcached; our lock-safe DatabaseCache; and the system check that flags the rest."""

from __future__ import annotations

import socket
import uuid

import pytest
from django.core.cache import caches
from powercrud.async_manager import AsyncManager

from otel_taskctx import checks
from otel_taskctx.conflicts import get_conflict_store
from otel_taskctx.errors import ConflictStoreUnavailable
from tests.conflict_caches import ALIAS, cache_config, use_locks_cache, wipe

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True)]
CHILD = "testapp.child"


def ids(messages):
    return [m.id for m in messages]


@pytest.fixture
def locks_cache():
    made = []

    def make(kind):
        prefix = f"store-evict-{uuid.uuid4().hex[:8]}"
        override = use_locks_cache(kind, prefix)
        override.enable()
        made.append((kind, override))
        wipe(kind)
        return AsyncManager()

    yield make
    for kind, override in reversed(made):
        wipe(kind)
        override.disable()


def test_a_store_on_a_culling_databasecache_refuses_to_lock(locks_cache):
    from django.core.cache.backends.db import DatabaseCache as DjangoDatabaseCache

    manager = locks_cache("plain-db")
    manager.cache = caches[ALIAS]  # Django's own object, not the lock-safe view powercrud gets
    assert type(manager.cache) is DjangoDatabaseCache
    store = get_conflict_store(manager)
    assert store.kind == "cache"  # the generic path, which refuses
    with pytest.raises(ConflictStoreUnavailable) as refused:
        store.reserve("job-1", {CHILD: range(10)})
    message = str(refused.value)
    assert f"cache {ALIAS!r}" in message and "MAX_ENTRIES" in message
    assert "'otel_taskctx.cache.DatabaseCache'" in message
    assert store.holders({CHILD: range(10)}) == {}  # nothing was locked
    # powercrud's own path is powercrud's: it locks (and its lock can be culled later)
    assert manager.add_conflict_ids("job-1", {CHILD: {1}}) is True
    assert manager.check_conflict({CHILD: [1]}) == {1}


def test_lock_safe_databasecache_keeps_locks_and_passes_the_check(locks_cache):
    manager = locks_cache("db")
    assert checks.check_lock_eviction() == []
    assert manager.add_conflict_ids("job-3", {CHILD: set(range(400))})  # powercrud's own path
    for i in range(400):
        manager.cache.set(f"unrelated:{i}", i)
    assert len(manager.check_conflict({CHILD: list(range(400))})) == 400
    # ordinary keys still live in the culled cache table; locks in the lock model
    cache = manager.cache
    assert not cache.is_lock_key("unrelated:1")
    assert cache.is_lock_key(f"powercrud:conflict:model:{CHILD}:1")
    assert sum(1 for _ in cache.get_many([f"unrelated:{i}" for i in range(400)])) < 400


def test_lock_safe_databasecache_routes_every_cache_operation(locks_cache):
    cache = locks_cache("db").cache
    lock, other = "powercrud:async:progress:t", "plain:key"
    assert cache.add(lock, "a") and not cache.add(lock, "b")
    cache.set(other, 1)
    assert cache.get_many([lock, other, "missing"]) == {lock: "a", other: 1}
    assert cache.has_key(lock) and cache.touch(lock, 60)
    assert cache.fallback.get(lock) is None  # the lock key is a row of our model
    assert cache.fallback.get(other) == 1
    assert cache.incr(other) == 2
    cache.set_many({lock: "c", other: 3})
    assert cache.get(lock) == "c" and cache.get(other) == 3
    cache.delete_many([lock, other])
    assert cache.get_many([lock, other]) == {}
    cache.set(lock, "d")
    assert cache.delete(lock) and cache.get(lock) is None
    cache.set(lock, "e")
    cache.clear()
    assert cache.get(lock) is None


def test_redis_without_eviction_passes_the_check(locks_cache):
    locks_cache("redis")
    policy, _ = checks._redis_memory_policy(ALIAS)
    assert policy == "noeviction"  # this machine's server
    assert checks.check_lock_eviction() == []


def test_redis_with_an_evicting_policy_is_flagged(locks_cache, monkeypatch):
    locks_cache("redis")
    monkeypatch.setattr(checks, "_redis_memory_policy", lambda cache: ("volatile-lru", 2**30))
    (msg,) = checks.check_lock_eviction()
    assert msg.id == "otel_taskctx.W032" and "volatile-lru" in msg.msg and "TTL" in msg.msg
    monkeypatch.setattr(checks, "_redis_memory_policy", lambda cache: ("allkeys-lru", 2**30))
    assert "any key" in checks.check_lock_eviction()[0].msg
    # an evicting policy without a memory limit never evicts
    monkeypatch.setattr(checks, "_redis_memory_policy", lambda cache: ("allkeys-lru", 0))
    assert checks.check_lock_eviction() == []


def test_redis_that_cannot_be_asked_warns(settings):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = dict(cache_config("redis", "x"), LOCATION=f"redis://127.0.0.1:{port}/5")
    settings.CACHES = {**settings.CACHES, ALIAS: config}
    settings.POWERCRUD_SETTINGS = {**settings.POWERCRUD_SETTINGS, "CACHE_NAME": ALIAS}
    (msg,) = checks.check_lock_eviction()
    assert msg.id == "otel_taskctx.W033" and "Could not read" in msg.msg


def test_memcached_is_flagged(settings):
    settings.CACHES = {
        **settings.CACHES,
        ALIAS: {"BACKEND": "django.core.cache.backends.memcached.PyMemcacheCache"},
    }
    settings.POWERCRUD_SETTINGS = {**settings.POWERCRUD_SETTINGS, "CACHE_NAME": ALIAS}
    assert ids(checks.check_lock_eviction()) == ["otel_taskctx.W031"]


def test_the_check_is_registered():
    from django.core.checks import run_checks

    found = [m for m in run_checks(tags=["caches"]) if m.id.startswith("otel_taskctx.W03")]
    assert found == []  # the test settings are lock-safe on both stacks
