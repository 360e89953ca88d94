"""task_context / current_task / skip_nested_async: nesting, restore, threads, decorator."""

import asyncio
import contextvars
import threading

import pytest
from opentelemetry import baggage, context

from otel_taskctx import TaskIdentity, current_task, skip_nested_async, task_context
from otel_taskctx.identity import BAGGAGE_ENTRY


def test_outside_a_task():
    assert current_task() is None
    assert skip_nested_async() is False


def test_identity_inside_and_restored_after():
    with task_context("job-1", "powercrud.async_manager.AsyncManager") as entered:
        ident = current_task()
        assert ident == entered
        assert ident.task_key == "job-1"
        assert ident.manager_class_path == "powercrud.async_manager.AsyncManager"
        assert ident.root_task_key == "job-1"
        assert ident.depth == 0
        assert ident.parent_task_key is None
        assert skip_nested_async() is True
        # it really is baggage: one compact entry
        assert baggage.get_baggage(BAGGAGE_ENTRY).startswith("v2.")
    assert current_task() is None
    assert baggage.get_all() == {}


def test_restored_when_body_raises():
    with pytest.raises(RuntimeError, match="boom"):
        with task_context("job-err"):
            assert current_task().task_key == "job-err"
            raise RuntimeError("boom")
    assert current_task() is None


def test_nesting_records_parent_root_and_depth():
    with task_context("root", "powercrud.async_manager.AsyncManager"):
        with task_context("mid"):
            mid = current_task()
            assert (mid.task_key, mid.parent_task_key, mid.root_task_key, mid.depth) == (
                "mid",
                "root",
                "root",
                1,
            )
            # the manager is inherited from the outer task
            assert mid.manager_class_path == "powercrud.async_manager.AsyncManager"
            with task_context("leaf"):
                leaf = current_task()
                assert (leaf.parent_task_key, leaf.root_task_key, leaf.depth) == ("mid", "root", 2)
            assert current_task().task_key == "mid"
        assert current_task().task_key == "root"
    assert current_task() is None


def test_decorator_form():
    seen = []

    @task_context("decorated")
    def work(x):
        seen.append((x, current_task().task_key))
        return x * 2

    assert work(3) == 6
    assert work(4) == 8
    assert seen == [(3, "decorated"), (4, "decorated")]
    assert current_task() is None


def test_decorator_restores_on_exception():
    @task_context("decorated-err")
    def fail():
        raise ValueError("nope")

    with pytest.raises(ValueError):
        fail()
    assert current_task() is None


def test_user_baggage_is_kept():
    token = context.attach(baggage.set_baggage("tenant", "acme"))
    try:
        with task_context("job"):
            assert baggage.get_baggage("tenant") == "acme"
        assert baggage.get_baggage("tenant") == "acme"
        assert current_task() is None
    finally:
        context.detach(token)


@pytest.mark.parametrize("bad", ["", "   ", None, 5, "a" * 201, "bad\nkey"])
def test_invalid_task_keys_raise_clearly(bad):
    with pytest.raises(ValueError, match="task_key"):
        task_context(bad)


@pytest.mark.parametrize("bad", ["notdotted", "os.system; rm", "1abc.Def", 42])
def test_invalid_manager_paths_raise_clearly(bad):
    with pytest.raises(ValueError, match="manager_class_path"):
        task_context("job", bad)


def test_threads_do_not_share_identity():
    results = {}
    barrier = threading.Barrier(2)

    def run(name):
        with task_context(name):
            barrier.wait()
            results[name] = current_task().task_key

    threads = [threading.Thread(target=run, args=(n,)) for n in ("t1", "t2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {"t1": "t1", "t2": "t2"}


def test_copied_context_carries_identity_into_a_thread():
    seen = []
    with task_context("carried"):
        ctx = contextvars.copy_context()
    t = threading.Thread(target=lambda: seen.append(ctx.run(current_task)))
    t.start()
    t.join()
    assert seen[0].task_key == "carried"


def test_asyncio_tasks_inherit_identity():
    async def child():
        await asyncio.sleep(0)
        return current_task().task_key

    async def main():
        with task_context("async-job"):
            return await asyncio.gather(child(), child())

    assert asyncio.run(main()) == ["async-job", "async-job"]


def test_identity_is_frozen():
    ident = TaskIdentity("k")
    with pytest.raises(AttributeError):
        ident.task_key = "other"
    assert ident.root_task_key == "k"


def test_signing_secret_missing_is_a_clear_error(settings):
    from otel_taskctx import identity

    settings.SECRET_KEY = ""  # Django refuses to hand out an empty SECRET_KEY
    identity.reset_signing()
    with pytest.raises(RuntimeError, match="signing secret"):
        with task_context("job"):
            pass
