"""The conflict store against real caches: our DatabaseCache (default MAX_ENTRIES), Redis,
and the generic per-key path, with powercrud's own AsyncManager reading the locks."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from django.core.management import call_command
from django_q.models import Task
from powercrud.async_manager import AsyncManager

from otel_taskctx.conflicts import (
    Reservation,
    backend_for,
    get_conflict_store,
    keep_locks_alive,
    keepalive,
    release_locks,
)
from otel_taskctx.errors import DescendantConflict
from tests.conflict_caches import lock_keys_left, use_locks_cache, wipe

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True)]

CHILD = "testapp.child"
# (cache kind, forced backend): the store chosen for the cache, and the generic path
VARIANTS = [("db", None), ("redis", None), ("db", "cache")]


@pytest.fixture(params=VARIANTS, ids=["database", "redis", "generic"])
def env(request):
    kind, backend = request.param
    prefix = f"store-test-{uuid.uuid4().hex[:8]}"
    with use_locks_cache(kind, prefix):
        wipe(kind)
        manager = AsyncManager()
        store = get_conflict_store(manager, backend=backend)
        yield Env(kind, manager, store)
        wipe(kind)


class Env:
    def __init__(self, kind, manager, store):
        self.kind, self.manager, self.store = kind, manager, store

    def holder(self, obj_id, model=CHILD):
        return self.manager.cache.get(f"powercrud:conflict:model:{model}:{obj_id}")

    def left(self, model=CHILD):
        return lock_keys_left(self.kind, model)


def test_the_backend_matches_the_cache(env):
    expected = {"db": "database", "redis": "redis"}[env.kind]
    assert backend_for(env.manager) == expected
    if env.store.kind != "cache":
        assert env.store.kind == expected


def test_locks_are_powercrud_locks_released_by_its_completion_hook(env):
    result = env.store.reserve("job-1", {CHILD: [1, 2, 3]})
    assert isinstance(result, Reservation) and result.reserved == {CHILD: [1, 2, 3]}
    # powercrud's views refuse edits of these objects
    assert env.manager.check_conflict({CHILD: [1, 2, 3, 4]}) == {1, 2, 3}
    assert env.holder(2) == "job-1"
    assert env.store.tracked_keys("job-1") == {
        f"powercrud:conflict:model:{CHILD}:{i}" for i in (1, 2, 3)
    }
    # the completion hook: handle_task_completion -> remove_active_task -> remove_conflict_ids
    env.manager.add_active_task("job-1")
    env.manager.handle_task_completion(Task(name="job-1", success=True), "job-1")
    assert env.manager.check_conflict({CHILD: [1, 2, 3]}) == set()
    assert env.left() == 0


def test_powercrud_completion_hook_releases_in_a_batch_and_spares_a_retaken_lock(env):
    # (the instrumentation, active in the tests, routes powercrud's remove_conflict_ids to the
    # store's compare-and-delete; powercrud's own loop deletes every tracked key)
    assert env.manager.add_conflict_ids("job-20", {"testapp.parent": {1}})  # launch lock
    assert env.store.reserve("job-20", {CHILD: list(range(1, 301))}).reserved
    env.manager.cache.set(f"powercrud:conflict:model:{CHILD}:300", "job-21")  # expired, retaken
    env.manager.add_active_task("job-20")
    env.manager.handle_task_completion(Task(name="job-20", success=True), "job-20")
    assert env.manager.check_conflict({CHILD: list(range(1, 300))}) == set()
    assert env.manager.check_conflict({"testapp.parent": [1]}) == set()
    assert env.holder(300) == "job-21"
    assert env.store.tracked_keys("job-20") == set()
    env.manager.cache.delete(f"powercrud:conflict:model:{CHILD}:300")
    assert env.left() == 0


def test_powercrud_cleanup_command_releases_descendant_locks(env):
    # the parent job's own launch locks (powercrud's path) plus descendants (ours)
    assert env.manager.add_conflict_ids("job-2", {"testapp.parent": {7}})
    env.store.reserve("job-2", {CHILD: range(50)})
    env.manager.add_active_task("job-2")  # no django-q2 Task row: "task missing" -> cleaned
    call_command("pcrud_cleanup_async", stdout=open("/dev/null", "w"))
    assert env.manager.check_conflict({CHILD: list(range(50)), "testapp.parent": [7]}) == set()
    assert env.left() == 0 and env.left("testapp.parent") == 0


def test_all_or_nothing_under_conflict_names_model_ids_and_holder(env):
    assert env.manager.add_conflict_ids("other", {CHILD: {5, 9}})
    with pytest.raises(DescendantConflict) as info:
        env.store.reserve("job-3", {CHILD: range(1, 11)})
    err = info.value
    assert (err.model, err.ids, err.holder_task_key, err.task_key) == (
        CHILD,
        [5, 9],
        "other",
        "job-3",
    )
    assert env.manager.check_conflict({CHILD: [1, 2, 3, 4, 6, 7, 8, 10]}) == set()
    assert env.holder(5) == "other"
    assert env.store.tracked_keys("job-3") == set()


def test_all_or_nothing_across_batches(env):
    env.store.batch_size = 40  # 200 ids: five batches; the conflict is in the last one
    assert env.manager.add_conflict_ids("other", {CHILD: {190}})
    with pytest.raises(DescendantConflict) as info:
        env.store.reserve("job-4", {CHILD: range(200)})
    assert info.value.conflicts == {CHILD: {190: "other"}}
    assert env.left() == 1  # only the other task's lock
    assert env.store.tracked_keys("job-4") == set()
    assert env.manager.cache.get("powercrud:async:conflict:job-4") in (None, set())
    # and the same batched reservation succeeds once the other task is done
    env.manager.remove_conflict_ids("other")
    assert env.store.reserve("job-4", {CHILD: range(200)}).count == 200
    assert len(env.store.tracked_keys("job-4")) == 200


def test_reentrant_ids_are_not_conflicts_and_never_rolled_back(env):
    first = env.store.reserve("job-5", {CHILD: [1, 2]})
    second = env.store.reserve("job-5", {CHILD: [2, 3]})
    assert first.reserved == {CHILD: [1, 2]}
    assert second.reserved == {CHILD: [3]} and second.already_held == {CHILD: [2]}
    assert env.manager.add_conflict_ids("other", {CHILD: {9}})
    with pytest.raises(DescendantConflict):
        env.store.reserve("job-5", {CHILD: [1, 2, 3, 4, 9]})
    assert [env.holder(i) for i in (1, 2, 3, 4)] == ["job-5", "job-5", "job-5", None]
    # powercrud's cache.add would have failed on the ids the task already holds
    assert not env.manager.add_conflict_ids("job-5", {CHILD: {1}})


def test_int_str_and_uuid_primary_keys(env):
    doc_ids = [uuid.uuid4(), uuid.uuid4()]
    env.store.reserve("job-6", {"testapp.tag": ["alpha", "beta"], "testapp.document": doc_ids})
    env.store.reserve("job-6", {CHILD: [1, "2", 3]})
    assert env.manager.check_conflict({"testapp.tag": ["alpha", "gamma"]}) == {"alpha"}
    assert env.manager.check_conflict({"testapp.document": doc_ids}) == set(doc_ids)
    assert env.manager.check_conflict({"testapp.document": [str(doc_ids[0])]}) == {str(doc_ids[0])}
    # "1" and 1 are the same lock (powercrud's key is the id's text)
    again = env.store.reserve("job-6", {CHILD: ["1", 2]})
    assert again.already_held == {CHILD: ["1", 2]}
    assert env.store.holders({CHILD: [1, 2, 3, 4]}) == {CHILD: {1: "job-6", 2: "job-6", 3: "job-6"}}


def test_long_and_unicode_ids_join_a_tracking_set_powercrud_wrote(env):
    long_id = "é" * 130  # a lock key of more than 255 bytes
    assert env.manager.add_conflict_ids("job-u", {"testapp.parent": {1}})  # powercrud's set
    env.store.reserve("job-u", {"testapp.tag": [long_id, "ü-1"]})
    env.store.reserve("job-u", {"testapp.tag": ["x"]})
    expected = {f"powercrud:conflict:model:testapp.tag:{i}" for i in (long_id, "ü-1", "x")}
    expected.add("powercrud:conflict:model:testapp.parent:1")
    assert env.manager.cache.get("powercrud:async:conflict:job-u") == expected
    assert env.manager.check_conflict({"testapp.tag": [long_id, "ü-1"]}) == {long_id, "ü-1"}
    assert env.store.release("job-u") == 4
    assert env.manager.check_conflict({"testapp.tag": [long_id], "testapp.parent": [1]}) == set()


def test_release_is_compare_and_delete(env):
    env.store.reserve("job-7", {CHILD: [1, 2, 3]})
    # job-7's lock on 2 expired and another task took it: job-7's tracking set still lists it
    env.manager.cache.delete(f"powercrud:conflict:model:{CHILD}:2")
    assert env.manager.add_conflict_ids("job-8", {CHILD: {2}})
    assert env.store.release("job-7") == 2
    assert env.holder(2) == "job-8"
    assert env.manager.check_conflict({CHILD: [1, 3]}) == set()
    assert env.store.tracked_keys("job-7") == set()
    assert release_locks("job-8", env.manager) == 1
    assert env.left() == 0


def test_an_expired_lock_of_another_task_is_taken_over_in_place(env):
    """The database takes an expired row over in its one conditional insert; the task that
    let it expire cannot release it any more."""
    if env.store.kind != "database":
        pytest.skip("the database backend's rows")
    from django.utils import timezone

    from otel_taskctx.cache import locks

    get_conflict_store(env.manager, backend="database", ttl=1).reserve("job-30", {CHILD: [1, 2]})
    row = locks().filter(cache_key__endswith=f"conflict:model:{CHILD}:1")
    deadline = time.monotonic() + 5
    while row.filter(expires__gte=timezone.now()).exists():  # until its TTL has passed
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert row.exists()  # expired, and still there
    result = env.store.reserve("job-31", {CHILD: [1, 3]})
    assert sorted(result.reserved[CHILD]) == [1, 3] and not result.already_held
    assert row.get().expires > timezone.now()
    assert env.store.release("job-30") == 1  # its own (expired) lock on 2; 1 is job-31's
    assert env.holder(1) == "job-31"
    assert env.store.release("job-31") == 2


def test_a_task_without_locks_is_released_and_refreshed_with_one_read_and_no_write(env):
    """Most jobs take no lock: powercrud's completion hook must not open a write transaction
    for them (on SQLite every process of the cluster queues on that one write lock)."""
    if env.store.kind != "database":
        pytest.skip("the database backend's statements")
    from django.db import connections
    from django.test.utils import CaptureQueriesContext

    env.store.reserve("job-holds", {CHILD: [1]})
    with CaptureQueriesContext(connections[env.store.db]) as queries:
        assert env.store.release("job-none") == 0
        assert env.store.refresh("job-none", 60) == 0
    statements = [q["sql"].split()[0].upper() for q in queries.captured_queries]
    assert statements == ["SELECT", "SELECT"], queries.captured_queries
    assert env.holder(1) == "job-holds"  # somebody else's lock untouched
    # a task that holds locks still goes through the transaction
    with CaptureQueriesContext(connections[env.store.db]) as queries:
        assert env.store.release("job-holds") == 1
    assert any(q["sql"].upper().startswith("DELETE") for q in queries.captured_queries)
    assert env.holder(1) is None
    assert env.left() == 0


def test_five_thousand_locks_stay_held_while_unrelated_cache_traffic_runs(env):
    n = 5000 if env.store.kind != "cache" else 1000  # the per-key path is slow: fewer
    ids = list(range(n))
    assert env.store.reserve("job-9", {CHILD: ids}).count == n
    cache = env.manager.cache
    for i in range(600):  # twice Django's default MAX_ENTRIES: the cache table culls
        cache.set(f"unrelated:{i}", "x" * 50, 300)
        if i % 50 == 0:
            cache.get_many([f"unrelated:{j}" for j in range(i)])
    held = env.store.holders({CHILD: ids})
    assert len(held[CHILD]) == n and set(held[CHILD].values()) == {"job-9"}
    assert env.manager.check_conflict({CHILD: ids[::50]}) == set(ids[::50])
    assert len(env.store.tracked_keys("job-9")) == n
    if env.kind == "db":  # the ordinary keys were culled as usual
        assert sum(1 for v in cache.get_many([f"unrelated:{i}" for i in range(600)])) < 600
    assert env.store.release("job-9") == n
    assert env.left() == 0


def test_concurrent_registration_from_threads_loses_no_tracking_entry(env):
    per_thread, threads = 6, 4
    errors = []
    start = threading.Barrier(threads)

    def register(n):
        try:
            start.wait()
            for step in range(per_thread):
                base = (n * per_thread + step) * 10
                # overlapping ids across threads of the same task: re-entrant
                env.store.reserve("job-10", {CHILD: list(range(base, base + 10)) + [999]})
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            from django.db import connections

            connections.close_all()

    workers = [threading.Thread(target=register, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert not errors, errors
    expected = {f"powercrud:conflict:model:{CHILD}:{i}" for i in range(threads * per_thread * 10)}
    expected.add(f"powercrud:conflict:model:{CHILD}:999")
    assert env.store.tracked_keys("job-10") == expected
    assert env.manager.cache.get("powercrud:async:conflict:job-10") == expected  # powercrud's view
    env.manager.remove_conflict_ids("job-10")  # powercrud's release path
    assert env.left() == 0


def test_two_tasks_racing_for_overlapping_ids_each_id_held_by_exactly_one(env):
    env.store.batch_size = 25
    won: dict[str, set[int]] = {"A": set(), "B": set()}
    lost = []
    errors = []
    start = threading.Barrier(2)

    def race(task, offset):
        try:
            start.wait()
            for step in range(8):
                ids = list(range(offset + step * 15, offset + step * 15 + 60))
                try:
                    got = env.store.reserve(task, {CHILD: ids})
                except DescendantConflict as exc:
                    assert all(h != task for h in exc.conflicts[CHILD].values())
                    lost.append(task)
                    continue
                won[task].update(got.reserved.get(CHILD, []))
                won[task].update(got.already_held.get(CHILD, []))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            from django.db import connections

            connections.close_all()

    threads = [
        threading.Thread(target=race, args=("A", 0)),
        threading.Thread(target=race, args=("B", 30)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert lost  # the first calls overlap: one of them lost
    assert not (won["A"] & won["B"])
    everything = set(range(0, 30 + 7 * 15 + 60))
    holders = env.store.holders({CHILD: everything})[CHILD]
    for task in ("A", "B"):
        assert {i for i, h in holders.items() if h == task} == won[task]
        # the tracking set lists exactly what the task holds: rollbacks left nothing behind
        assert env.store.tracked_keys(task) == {
            f"powercrud:conflict:model:{CHILD}:{i}" for i in won[task]
        }
    assert set(holders) == won["A"] | won["B"]
    env.store.release("A")
    env.store.release("B")
    assert env.left() == 0


def _held_for_refresh(env, ttl, held):
    """A store of ``env``'s backend with lock TTL ``ttl`` in which each task of ``held`` (task
    key -> ids) holds its ids; the manager then builds its own store, as keep_locks_alive
    does. The generic backend is skipped: keep_locks_alive uses the cache's own store."""
    if env.store.kind == "cache":
        pytest.skip("keep_locks_alive uses the cache's own store: covered by 'database'")
    store = get_conflict_store(env.manager, backend=env.store.kind, ttl=ttl)
    for task, ids in held.items():
        store.reserve(task, {CHILD: ids})
    return store


def test_keep_locks_alive_refreshes_until_the_block_ends(env):
    _held_for_refresh(env, 2, {"job-11": [1, 2]})
    with keep_locks_alive("job-11", env.manager, interval=0.4, ttl=2) as keeper:
        time.sleep(2.7)  # longer than the TTL
        assert keeper.refreshes >= 4 and keeper.last_error is None
        assert keeper.refreshed == 2
        assert env.manager.check_conflict({CHILD: [1, 2]}) == {1, 2}
    assert not keeper.is_alive()
    time.sleep(2.3)  # no refresh any more: the locks expire as if the worker had died
    assert env.manager.check_conflict({CHILD: [1, 2]}) == set()


def test_one_refresher_serves_overlapping_blocks_and_a_stopped_task_is_never_refreshed(env):
    store = _held_for_refresh(env, 2, {"job-12": [1], "job-13": [2, 3]})
    before = {t.name for t in threading.enumerate()}
    with keep_locks_alive("job-12", env.manager, interval=0.3, ttl=2) as short:
        with keep_locks_alive("job-13", env.manager, interval=0.5, ttl=2) as long:
            started = {t.name for t in threading.enumerate()} - before
            # no thread per block: at most the process's one refresher was started
            assert started <= {"otel-taskctx-lock-refresher"}
            time.sleep(1.2)
            assert short.refreshes >= 3 and short.refreshed == 1
            assert long.refreshes >= 2 and long.refreshed == 2
        assert not long.is_alive() and short.is_alive()
        stopped_at = long.refreshes
        time.sleep(0.9)
        assert long.refreshes == stopped_at  # never refreshed after its block ended
        assert short.refreshes >= 6
        time.sleep(1.3)  # job-13's locks (not refreshed for > TTL) expired; job-12's did not
        assert env.manager.check_conflict({CHILD: [1, 2, 3]}) == {1}
    assert not short.is_alive()
    store.release("job-12")
    assert env.left() == 0


def test_a_block_due_sooner_than_the_sleeping_refresher_is_refreshed_on_time(env):
    # the refresher sleeps until its earliest entry is due (here: 30 s away) and is woken only
    # by an entry due sooner than that
    store = _held_for_refresh(env, 60, {"job-15": [5]})
    with keep_locks_alive("job-16", env.manager, interval=30, ttl=60) as slow:
        time.sleep(0.2)  # the refresher is asleep until job-16 is due
        with keep_locks_alive("job-15", env.manager, interval=0.2, ttl=60) as fast:
            deadline = time.monotonic() + 5
            while fast.refreshes < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert fast.refreshes >= 2 and fast.refreshed == 1
        assert slow.refreshes == 0
    store.release("job-15")
    assert env.left() == 0


def test_short_blocks_one_after_another_do_not_wake_the_refresher(env):
    # a worker runs a short job every few milliseconds: registering each with the sleeping
    # refresher must not wake it (a wake-up per job was a thread switch per job). Entries of
    # ended blocks stay in the schedule until due, so the refresher keeps sleeping until the
    # first of them and each new entry, due later, leaves it asleep.
    _held_for_refresh(env, 60, {})  # locks or none: the schedule is the same
    refresher = keepalive.refresher
    with keep_locks_alive("job-s-first", env.manager, interval=30, ttl=60):
        pass
    time.sleep(0.05)  # the refresher is asleep, as between jobs
    woken = refresher.wakeups
    for n in range(100):
        with keep_locks_alive(f"job-s{n}", env.manager, interval=30, ttl=60) as keeper:
            assert keeper.is_alive()
        time.sleep(0.002)  # the worker waits for its next job: the refresher may run
    assert refresher.wakeups - woken <= 1
    assert env.left() == 0


def test_a_block_that_ends_while_its_refresh_runs_waits_for_it(env):
    store = _held_for_refresh(env, 5, {"job-14": [4]})
    in_refresh, release, finished = threading.Event(), threading.Event(), threading.Event()
    refreshed_after_exit = []
    exited = threading.Event()
    shared = get_conflict_store(env.manager)  # the store keep_locks_alive refreshes through
    real_refresh = type(shared).refresh

    def slow_refresh(self, task_key, ttl=None):
        in_refresh.set()
        release.wait(5)
        count = real_refresh(self, task_key, ttl)
        if exited.is_set():
            refreshed_after_exit.append(task_key)
        finished.set()
        return count

    shared.refresh = slow_refresh.__get__(shared)
    block = keep_locks_alive("job-14", env.manager, interval=0.05, ttl=5)
    keeper = block.__enter__()
    assert in_refresh.wait(5)
    threading.Timer(0.3, release.set).start()
    block.__exit__(None, None, None)  # waits for the round under way to finish
    exited.set()
    assert finished.is_set()
    assert keeper.refreshes >= 1 and not keeper.is_alive()
    time.sleep(0.3)
    assert refreshed_after_exit == []
    store.release("job-14")
    assert env.left() == 0


@pytest.mark.parametrize("kind", ["db", "redis"])
def test_a_custom_key_function_is_honoured(kind, settings):
    from django.core.cache import caches

    from tests.conflict_caches import ALIAS, cache_config

    prefix = f"store-kf-{uuid.uuid4().hex[:8]}"
    config = dict(cache_config(kind, prefix), KEY_FUNCTION="tests.conflict_caches.suffix_key")
    settings.CACHES = {**settings.CACHES, ALIAS: config}
    settings.POWERCRUD_SETTINGS = {**settings.POWERCRUD_SETTINGS, "CACHE_NAME": ALIAS}
    manager = AsyncManager()
    store = get_conflict_store(manager)
    assert store.kind == {"db": "database", "redis": "redis"}[kind]
    store.reserve("job-kf", {CHILD: [1, 2]})
    store.reserve("job-kf", {CHILD: [2, 3]})
    assert manager.check_conflict({CHILD: [1, 2, 3, 4]}) == {1, 2, 3}
    assert caches[ALIAS].make_key(f"powercrud:conflict:model:{CHILD}:1").endswith(prefix)
    manager.remove_conflict_ids("job-kf")
    assert manager.check_conflict({CHILD: [1, 2, 3]}) == set()
    if kind == "redis":
        assert caches[ALIAS].keys("*") == []


def test_managers_of_one_cache_share_a_store_until_the_lock_ttl_changes(settings):
    # powercrud builds a new AsyncManager for every completion hook: its release must not
    # build a new store (Lua scripts, key probes) each time
    first = get_conflict_store(AsyncManager())
    again = get_conflict_store(AsyncManager())
    assert again is first and again.cache is AsyncManager().cache
    settings.OTEL_TASKCTX = {**settings.OTEL_TASKCTX, "LOCK_TTL": 1234}
    other = get_conflict_store(AsyncManager())
    assert other is not first and other.ttl == 1234
    seen = []
    thread = threading.Thread(target=lambda: seen.append(get_conflict_store(AsyncManager())))
    thread.start()
    thread.join(10)
    # another thread has its own cache object, so its own store
    assert seen and seen[0] is not other and seen[0].cache is not other.cache


def test_a_shared_store_does_not_outlive_its_cache():
    import gc
    import weakref

    from django.core.cache.backends.locmem import LocMemCache

    manager = AsyncManager()
    manager.cache = LocMemCache(f"shared-{uuid.uuid4().hex}", {})
    store = weakref.ref(get_conflict_store(manager))
    cache = weakref.ref(manager.cache)
    del manager
    gc.collect()
    # what a finished thread leaves behind (its cache objects) takes its stores with it
    assert cache() is None and store() is None
