"""On a cache whose locks cannot be kept, powercrud's own calls are powercrud's.

Each test runs one scenario of powercrud's public ``AsyncManager`` methods twice on a fresh
real cache: once as plain powercrud (the instrumentor uninstrumented and
``otel_taskctx.powercrud_cache`` uninstalled: no wrapper of ours on ``AsyncManager``) and
once with the app's wrappers in place, and asserts the same return values, exceptions and
cache contents. The caches are a ``FileBasedCache`` in a temporary directory and a culling
``DatabaseCache`` subclass (both accepted by powercrud, both lose locks: W030), and
``LocMemCache`` / ``DummyCache`` (refused by powercrud itself: W004).

powercrud 0.9.16's sdist ships no tests; the scenarios carry the names of the tests in
powercrud's repository (``src/tests/async_tests/test_sys_functions.py``) that exercise the
same methods, which its own suite runs on a ``FileBasedCache``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
import wrapt
from django.core.cache.backends.db import DatabaseCache as DjangoDatabaseCache
from django.core.checks import WARNING, run_checks
from django.core.management import call_command
from django.test.utils import override_settings
from opentelemetry.instrumentation.taskctx import TaskContextInstrumentor
from powercrud.async_manager import AsyncManager

from otel_taskctx import powercrud_cache
from tests.conflict_caches import ALIAS

pytestmark = [pytest.mark.stack, pytest.mark.django_db]
BOOK, AUTHOR = "myapp.Book", "myapp.Author"
LOCK = "powercrud:conflict:model:"
TRACKING = "powercrud:async:conflict:"


class CullingCache(DjangoDatabaseCache):
    """A ``DatabaseCache`` subclass: culls like Django's, not replaced by the lock-safe view."""


def _config(kind: str, tmp_path) -> dict[str, Any]:
    if kind == "filebased":
        return {
            "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
            "LOCATION": str(tmp_path / f"cache-{uuid.uuid4().hex[:8]}"),
        }
    if kind == "culling-db":
        return {
            "BACKEND": "tests.test_weak_caches.CullingCache",
            "LOCATION": "taskctx_cache",
            "KEY_PREFIX": f"weak-{uuid.uuid4().hex[:8]}",
        }
    return {"BACKEND": f"django.core.cache.backends.{kind}"}


def _ours_on_async_manager() -> list[str]:
    return [n for n, v in vars(AsyncManager).items() if isinstance(v, wrapt.FunctionWrapper)]


class Plain:
    """powercrud as it is without otel_taskctx: our wrappers removed, put back on exit."""

    def __enter__(self) -> Plain:
        self.instrumentor = TaskContextInstrumentor()
        self.was_instrumented = self.instrumentor.is_instrumented_by_opentelemetry
        if self.was_instrumented:
            self.instrumentor.uninstrument()
        self.was_installed = powercrud_cache.installed()
        powercrud_cache.uninstall()
        assert _ours_on_async_manager() == []
        return self

    def __exit__(self, *exc: object) -> None:
        if self.was_installed:
            powercrud_cache.install()
        if self.was_instrumented:
            self.instrumentor.instrument()


def _run(scenario: Callable[[AsyncManager], Any], config: dict[str, Any]) -> Any:
    """``scenario(manager)`` on a fresh cache of ``config``; what it returned or raised."""
    from django.conf import settings

    with override_settings(
        CACHES={**settings.CACHES, ALIAS: config},
        POWERCRUD_SETTINGS={**settings.POWERCRUD_SETTINGS, "CACHE_NAME": ALIAS},
    ):
        if "LOCATION" in config and "KEY_PREFIX" in config:  # the DatabaseCache subclass
            call_command("createcachetable", verbosity=0)  # none on the Redis stack
        try:
            manager = AsyncManager()
        except Exception as exc:  # powercrud refuses LocMem and Dummy caches
            return ("raised", type(exc).__name__, str(exc))
        manager.cache.clear()
        try:
            return scenario(manager)
        finally:
            manager.cache.clear()


def same_as_plain(scenario: Callable[[AsyncManager], Any], kind: str, tmp_path) -> Any:
    """Run ``scenario`` as plain powercrud and with the app; assert the same outcome."""
    with Plain():
        plain = _run(scenario, _config(kind, tmp_path))
    wrapped = set(_ours_on_async_manager())
    assert {"get_cache", "remove_conflict_ids", "launch_async_task"} <= wrapped  # ours are on
    with_app = _run(scenario, _config(kind, tmp_path))
    assert with_app == plain
    return with_app


@pytest.fixture(params=["filebased", "culling-db"])
def kind(request):
    return request.param


def _get(manager: AsyncManager, *keys: str) -> list[Any]:
    return [manager.cache.get(k) for k in keys]


# ------------------------------------------- powercrud's tests/async_tests/test_sys_functions.py
def test_add_and_remove_active_task(kind, tmp_path):
    def scenario(m):
        added = m.add_active_task("test_task_1", {"myapp.TestModel": {1, 2, 3}})
        active = m.get_active_tasks()
        removed = m.remove_active_task("test_task_1")
        return added, active, removed, m.get_active_tasks(), _get(m, f"{LOCK}myapp.TestModel:1")

    assert same_as_plain(scenario, kind, tmp_path) == (
        True,
        {"test_task_1"},
        True,
        set(),
        [None],
    )


def test_add_conflict_ids_success(kind, tmp_path):
    def scenario(m):
        added = m.add_conflict_ids("task_123", {BOOK: {1, 2, 3}, AUTHOR: {10, 20}})
        locks = _get(m, f"{LOCK}{BOOK}:1", f"{LOCK}{BOOK}:2", f"{LOCK}{AUTHOR}:10")
        return added, locks, len(m.cache.get(f"{TRACKING}task_123"))

    assert same_as_plain(scenario, kind, tmp_path) == (True, ["task_123"] * 3, 5)


def test_add_conflict_ids_conflict_detected(kind, tmp_path):
    def scenario(m):
        first = m.add_conflict_ids("task_first", {BOOK: {1, 2, 3}})
        second = m.add_conflict_ids("task_second", {BOOK: {2, 3, 4}})
        return first, second, _get(m, f"{LOCK}{BOOK}:2", f"{LOCK}{BOOK}:4")

    assert same_as_plain(scenario, kind, tmp_path) == (True, False, ["task_first", None])


def test_check_conflict_with_conflicts(kind, tmp_path):
    def scenario(m):
        m.add_conflict_ids("existing_task", {BOOK: {2, 5}})
        return m.check_conflict({BOOK: [1, 2, 3], AUTHOR: [10, 20]})

    assert same_as_plain(scenario, kind, tmp_path) == {2}


def test_remove_conflict_ids_cleanup(kind, tmp_path):
    def scenario(m):
        m.add_conflict_ids("cleanup_task", {BOOK: {1, 2}, AUTHOR: {10}})
        before = _get(m, f"{LOCK}{BOOK}:1")
        removed = m.remove_conflict_ids("cleanup_task")
        after = _get(m, f"{LOCK}{BOOK}:1", f"{LOCK}{AUTHOR}:10", f"{TRACKING}cleanup_task")
        return before, removed, after

    assert same_as_plain(scenario, kind, tmp_path) == (["cleanup_task"], None, [None] * 3)


def test_atomic_reservation_rollback(kind, tmp_path):
    def scenario(m):
        m.add_conflict_ids("blocker_task", {BOOK: {2}})
        result = m.add_conflict_ids("rollback_task", {BOOK: {1, 2, 3}})
        return result, _get(m, *(f"{LOCK}{BOOK}:{i}" for i in (1, 2, 3)))

    assert same_as_plain(scenario, kind, tmp_path) == (False, [None, "blocker_task", None])


def test_dual_key_structure(kind, tmp_path):
    def scenario(m):
        m.add_conflict_ids("dual_key_test", {BOOK: {100, 200}})
        return _get(m, f"{LOCK}{BOOK}:100", f"{LOCK}{BOOK}:200", f"{TRACKING}dual_key_test")

    assert same_as_plain(scenario, kind, tmp_path) == [
        "dual_key_test",
        "dual_key_test",
        {f"{LOCK}{BOOK}:100", f"{LOCK}{BOOK}:200"},
    ]


def test_idempotent_cleanup(kind, tmp_path):
    def scenario(m):
        m.add_conflict_ids("idempotent_test", {BOOK: {1}})
        return m.remove_conflict_ids("idempotent_test"), m.remove_conflict_ids("idempotent_test")

    assert same_as_plain(scenario, kind, tmp_path) == (None, None)


def test_concurrent_atomic_reservation(kind, tmp_path):
    def scenario(m):
        first = m.add_conflict_ids("concurrent_1", {BOOK: {42}})
        second = m.add_conflict_ids("concurrent_2", {BOOK: {42}})
        return first, second, _get(m, f"{LOCK}{BOOK}:42")

    assert same_as_plain(scenario, kind, tmp_path) == (True, False, ["concurrent_1"])


def test_cleanup_completed_tasks_removes_artifacts(kind, tmp_path):
    def scenario(m):
        m.add_conflict_ids("cleanup-task-missing", {"sample.Book": {42}})
        m.add_active_task("cleanup-task-missing")
        summary = m.cleanup_completed_tasks()  # no django-q2 Task of that name
        cleaned = summary["cleaned"]["cleanup-task-missing"]
        return (
            summary["active_tasks"],
            cleaned["conflict_lock_keys"],
            cleaned["progress_entries"],
            _get(m, f"{LOCK}sample.Book:42"),
            m.get_active_tasks(),
        )

    assert same_as_plain(scenario, kind, tmp_path) == (1, 1, 1, [None], set())


def test_launch_blocks_on_conflict(kind, tmp_path):
    def scenario(m):
        m.add_conflict_ids("existing_task_123", {BOOK: {2, 3}})
        try:
            m.launch_async_task(
                "tests.testapp.reliability.report_context", "x", conflict_ids={BOOK: {1, 2, 4}}
            )
        except Exception as exc:  # powercrud raises a bare Exception; nothing is enqueued
            locks = _get(m, *(f"{LOCK}{BOOK}:{i}" for i in (1, 2, 4)))
            return str(exc), locks, m.get_active_tasks()
        return None

    assert same_as_plain(scenario, kind, tmp_path) == (
        "Cannot launch task - conflicts detected with existing operations",
        [None, "existing_task_123", None],
        set(),
    )


def held_in_job(ids: list[int], task_key: str | None = None) -> dict[str, Any]:
    """A job (run by django-q2 ``sync``): what powercrud's cache holds while it runs."""
    m = AsyncManager()
    return {
        "locked": sorted(m.check_conflict({BOOK: ids})),
        "lock": m.cache.get(f"{LOCK}{BOOK}:{ids[0]}") == task_key,
        "tracking": len(m.cache.get(f"{TRACKING}{task_key}") or ()),
        "progress": m.get_progress(task_key),
    }


@pytest.mark.usefixtures("export_spans_after_test")
def test_launch_async_task_with_conflict_ids_success(kind, tmp_path):
    """powercrud's launch locks, creates the progress key, runs the job (django-q2 ``sync``)
    and registers the task; its completion hook has released the locks by then."""
    from django_q.models import Task

    def scenario(m):
        key = m.launch_async_task(
            "tests.test_weak_caches.held_in_job",
            [1, 2, 3],
            conflict_ids={BOOK: {1, 2, 3}},
            sync=True,
        )
        task = Task.objects.get(name=key)
        return (
            len(key),
            task.success,
            task.result,
            m.check_conflict({BOOK: [1, 2, 3]}),
            key in m.get_active_tasks(),  # powercrud registers it after the sync run
        )

    assert same_as_plain(scenario, kind, tmp_path) == (
        36,
        True,
        {"locked": [1, 2, 3], "lock": True, "tracking": 3, "progress": "pending"},
        set(),
        True,
    )


def test_add_active_task_no_double_locking(kind, tmp_path):
    def scenario(m):
        m.add_conflict_ids("no_double_lock_test", {BOOK: {50, 51}})
        added = m.add_active_task("no_double_lock_test", conflict_ids=None)
        locks = _get(m, f"{LOCK}{BOOK}:50", f"{LOCK}{BOOK}:51")
        return added, "no_double_lock_test" in m.get_active_tasks(), locks

    assert same_as_plain(scenario, kind, tmp_path) == (True, True, ["no_double_lock_test"] * 2)


def test_progress_key_lifecycle(kind, tmp_path):
    def scenario(m):
        key = m.create_progress_key("progress_test_123")
        seen = [m.get_progress("progress_test_123")]
        for message in ("50% complete", "100% complete"):
            m.update_progress("progress_test_123", message)
            seen.append(m.get_progress("progress_test_123"))
        m.remove_progress_key("progress_test_123")
        return key, seen, m.get_progress("progress_test_123")

    assert same_as_plain(scenario, kind, tmp_path) == (
        "powercrud:async:progress:progress_test_123",
        ["pending", "50% complete", "100% complete"],
        None,
    )


def test_cache_add_atomicity(kind, tmp_path):
    def scenario(m):
        key = f"{LOCK}{BOOK}:999"
        return m.cache.add(key, "task_1", 300), m.cache.add(key, "task_2", 300), _get(m, key)

    assert same_as_plain(scenario, kind, tmp_path) == (True, False, ["task_1"])


# ----------------------------------------------------------------------- beyond those names
def test_remove_conflict_ids_deletes_every_tracked_key(kind, tmp_path):
    """powercrud deletes every key in the tracking set, also a lock another task took after
    the first one's expired; on a cache that loses locks anyway, that stays powercrud's."""

    def scenario(m):
        m.add_conflict_ids("job-a", {BOOK: {1}})
        m.cache.delete(f"{LOCK}{BOOK}:1")  # as if culled or expired
        taken = m.add_conflict_ids("job-b", {BOOK: {1}})
        m.remove_conflict_ids("job-a")
        return taken, _get(m, f"{LOCK}{BOOK}:1")

    assert same_as_plain(scenario, kind, tmp_path) == (True, [None])


def test_the_worker_leaves_powercrud_lock_ttls_alone_on_a_weak_cache(kind, tmp_path, settings):
    """A job's worker refreshes its locks' TTL where they are kept; on a weak cache it
    starts no refresher, so powercrud's locks keep powercrud's CONFLICT_TTL."""
    from opentelemetry.instrumentation.taskctx import runs

    from otel_taskctx.identity import TaskIdentity

    identity = TaskIdentity("job-ttl", "powercrud.async_manager.AsyncManager")
    keeper = runs.keep_locks_alive(identity)  # the test settings' lock-safe cache
    assert keeper is not None and keeper.is_alive()
    keeper.stop()
    settings.CACHES = {**settings.CACHES, ALIAS: _config(kind, tmp_path)}
    settings.POWERCRUD_SETTINGS = {**settings.POWERCRUD_SETTINGS, "CACHE_NAME": ALIAS}
    if kind == "culling-db":
        call_command("createcachetable", verbosity=0)
    assert runs.keep_locks_alive(identity) is None


@pytest.mark.parametrize("backend", ["locmem.LocMemCache", "dummy.DummyCache"])
def test_process_local_caches_are_refused_by_powercrud_alone(backend, tmp_path):
    outcome = same_as_plain(lambda m: "built", backend, tmp_path)
    assert outcome[:2] == ("raised", "ImproperlyConfigured")
    assert "single-process only" in outcome[2]


# --------------------------------------------------------------------------------- the checks
@pytest.mark.parametrize(
    ("kind", "check", "says"),
    [
        ("filebased", "otel_taskctx.W030", "add() is not atomic"),
        ("culling-db", "otel_taskctx.W030", "culls entries once it holds MAX_ENTRIES (300)"),
        ("locmem.LocMemCache", "otel_taskctx.W004", "lives in one process"),
        ("dummy.DummyCache", "otel_taskctx.W004", "stores nothing"),
    ],
)
def test_each_weak_cache_gets_one_warning(kind, check, says, tmp_path, settings):
    settings.CACHES = {**settings.CACHES, ALIAS: _config(kind, tmp_path)}
    settings.POWERCRUD_SETTINGS = {**settings.POWERCRUD_SETTINGS, "CACHE_NAME": ALIAS}
    found = [m for m in run_checks(tags=["caches"]) if m.id.startswith("otel_taskctx.")]
    # (a database cache on the models' connection also gets W040, about transactions)
    found = [m for m in found if m.id != "otel_taskctx.W040"]
    assert [(m.id, m.level) for m in found] == [(check, WARNING)]
    assert says in found[0].msg and "two jobs can" in found[0].msg
    assert "'otel_taskctx.cache.DatabaseCache'" in found[0].hint
