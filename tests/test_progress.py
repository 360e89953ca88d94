"""Progress throttling: bursts are coalesced, the newest message lands, flush writes the last."""

from __future__ import annotations

import threading
import time

import pytest
from powercrud.async_manager import AsyncManager

from otel_taskctx import flush_progress, report_progress, task_context

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True)]
MANAGER = "tests.test_progress.CountingManager"


class CountingManager(AsyncManager):
    """powercrud's manager, counting the progress writes that reach the cache."""

    writes: dict[str, list[str]] = {}
    lock = threading.Lock()

    def update_progress(self, task_name, progress_data):
        with self.lock:
            self.writes.setdefault(task_name, []).append(progress_data)
        super().update_progress(task_name, progress_data)


@pytest.fixture
def manager(settings):
    from django.core.cache import cache

    cache.clear()
    CountingManager.writes.clear()
    yield AsyncManager()
    cache.clear()


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def timers_done(timeout=5.0):
    """Wait until no progress timer is pending: each held message's turn came and went."""
    deadline = time.monotonic() + timeout
    while timers := [t for t in threading.enumerate() if t.name == "otel-taskctx-progress"]:
        assert time.monotonic() < deadline, "a progress timer never ran"
        for timer in timers:
            timer.join(max(0.0, deadline - time.monotonic()))


def test_a_burst_is_throttled_and_the_newest_message_lands(manager, settings):
    settings.OTEL_TASKCTX = {"PROGRESS_MIN_INTERVAL": 0.2}
    started = time.monotonic()
    with task_context("burst-1", MANAGER):
        for i in range(300):
            assert report_progress(f"step {i}")
    elapsed = time.monotonic() - started
    assert manager.get_progress("burst-1") == "step 0"  # the first write is immediate
    # nobody reports any more: the held message is written when the interval is up
    assert wait_for(lambda: manager.get_progress("burst-1") == "step 299")
    writes = CountingManager.writes["burst-1"]
    assert len(writes) <= elapsed / 0.2 + 3 and writes[-1] == "step 299"


def test_flush_progress_writes_the_held_message_now(manager, settings):
    settings.OTEL_TASKCTX = {"PROGRESS_MIN_INTERVAL": 30}
    with task_context("burst-2", MANAGER):
        report_progress("first")
        report_progress("second")
        report_progress("third")
    assert manager.get_progress("burst-2") == "first"
    assert flush_progress("burst-2") is True  # the worker instrumentation calls this at job end
    assert manager.get_progress("burst-2") == "third"
    assert flush_progress("burst-2") is False
    assert CountingManager.writes["burst-2"] == ["first", "third"]


def test_no_older_message_overwrites_a_newer_one(manager, settings):
    settings.OTEL_TASKCTX = {"PROGRESS_MIN_INTERVAL": 0.3}
    with task_context("burst-3", MANAGER):
        report_progress("a")
        report_progress("b")
        report_progress("c")
        flush_progress("burst-3")
    timers_done()  # the background writer had "b" and "c" held: it must not write either
    assert manager.get_progress("burst-3") == "c"
    assert CountingManager.writes["burst-3"] == ["a", "c"]


def test_each_task_has_its_own_interval(manager, settings):
    settings.OTEL_TASKCTX = {"PROGRESS_MIN_INTERVAL": 30}
    with task_context("burst-4", MANAGER):
        report_progress("four")
    with task_context("burst-5", MANAGER):
        report_progress("five")
    assert manager.get_progress("burst-4") == "four"
    assert manager.get_progress("burst-5") == "five"


def test_interval_zero_writes_every_message(manager, settings):
    settings.OTEL_TASKCTX = {"PROGRESS_MIN_INTERVAL": 0}
    with task_context("burst-6", MANAGER):
        for i in range(5):
            report_progress(str(i))
            assert manager.get_progress("burst-6") == str(i)
    assert CountingManager.writes["burst-6"] == ["0", "1", "2", "3", "4"]


def test_a_held_message_does_not_outlive_the_job(manager, settings):
    """powercrud's completion hook deletes the progress key: nothing may write it again."""
    settings.OTEL_TASKCTX = {"PROGRESS_MIN_INTERVAL": 0.3}
    with task_context("burst-7", MANAGER):
        report_progress("working")
        report_progress("almost done")  # held
    manager.add_active_task("burst-7")
    manager.remove_active_task("burst-7")  # what handle_task_completion does
    timers_done()
    assert manager.get_progress("burst-7") is None
    assert manager.cache.has_key("powercrud:async:progress:burst-7") is False
    assert flush_progress("burst-7") is False


def test_a_held_message_never_lands_after_the_jobs_own_final_message(manager, settings):
    """powercrud writes "completed update" itself, past the throttle: a message held before
    it (by the timer or by the flush at the job's end) must not overwrite it."""
    settings.OTEL_TASKCTX = {"PROGRESS_MIN_INTERVAL": 0.3}
    with task_context("burst-8", MANAGER):
        report_progress("chapter 4/5")
        report_progress("chapter 5/5")  # held
        AsyncManager().update_progress("burst-8", "completed update: 1 processed")
        timers_done()  # the timer's turn came and went
        assert manager.get_progress("burst-8") == "completed update: 1 processed"
        report_progress("chapter 1/5")  # written (due again)
        report_progress("chapter 2/5")  # held: the timer is due in 0.3 s
        AsyncManager().update_progress("burst-8", "completed update: 1 processed")
    assert flush_progress("burst-8") is False  # the worker's flush at the job's end
    assert manager.get_progress("burst-8") == "completed update: 1 processed"
    assert "chapter 5/5" not in CountingManager.writes["burst-8"]
    assert "chapter 2/5" not in CountingManager.writes["burst-8"]


class BlockingManager(AsyncManager):
    """A manager whose progress writes wait, like a write blocked on a row the job locked."""

    release = threading.Event()
    entered = threading.Event()

    def update_progress(self, task_name, progress_data):
        if threading.current_thread().name == "otel-taskctx-progress":
            self.entered.set()
            self.release.wait(10)
        super().update_progress(task_name, progress_data)


def test_the_job_never_waits_for_a_blocked_background_write(manager, settings):
    """Regression: the background writer held the throttle lock while its write waited on
    a lock the job's transaction held, and the job then waited on the throttle lock."""
    settings.OTEL_TASKCTX = {"PROGRESS_MIN_INTERVAL": 0.05}
    BlockingManager.release.clear()
    BlockingManager.entered.clear()
    done = threading.Event()

    def job():
        with task_context("blocked-1", "tests.test_progress.BlockingManager"):
            report_progress("first")  # written now, by the job's thread
            report_progress("held")  # held: the background thread writes it and blocks
            assert BlockingManager.entered.wait(5)
            for i in range(20):  # the job goes on reporting while the writer is stuck
                report_progress(f"more {i}")
                time.sleep(0.01)
        done.set()

    thread = threading.Thread(target=job)
    thread.start()
    try:
        assert done.wait(5), "the job blocked behind the background progress writer"
    finally:
        BlockingManager.release.set()
        thread.join(10)
    assert flush_progress("blocked-1") in (True, False)
    assert wait_for(lambda: manager.get_progress("blocked-1") == "more 19")
