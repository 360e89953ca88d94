"""otel_taskctx.compat is a drop-in for powercrud.async_context, backed by the baggage identity."""

import inspect

import pytest
from powercrud import async_context as pc
from powercrud.async_manager import AsyncManager

from otel_taskctx import compat, extract, inject
from otel_taskctx.context import attached

NAMES = ["task_context", "get_current_task", "skip_nested_async", "register_descendant_conflicts"]


@pytest.mark.parametrize("name", NAMES)
def test_same_signatures(name):
    ours = inspect.signature(getattr(compat, name))
    theirs = inspect.signature(getattr(pc, name))
    assert list(ours.parameters) == list(theirs.parameters)
    for p in ours.parameters:
        assert ours.parameters[p].default == theirs.parameters[p].default
        assert ours.parameters[p].kind == theirs.parameters[p].kind


@pytest.mark.parametrize("mod", [pc, compat], ids=["powercrud", "compat"])
def test_same_observable_behaviour_in_process(mod):
    assert mod.get_current_task() is None
    assert mod.skip_nested_async() is False
    with mod.task_context("job-c", "powercrud.async_manager.AsyncManager"):
        ctx = mod.get_current_task()
        assert isinstance(ctx, pc.TaskContext)
        assert ctx.task_name == "job-c"
        assert ctx.manager_class_path == "powercrud.async_manager.AsyncManager"
        assert mod.skip_nested_async() is True
    assert mod.get_current_task() is None
    with pytest.raises(KeyError):
        with mod.task_context("job-c"):
            raise KeyError("x")
    assert mod.skip_nested_async() is False


def test_unlike_powercrud_the_identity_crosses_a_carrier():
    with compat.task_context("job-x"):
        carrier = {}
        inject(carrier)
    with pc.task_context("job-y"):
        carrier_pc = {}
        inject(carrier_pc)
    with attached(extract(carrier)):
        assert compat.get_current_task().task_name == "job-x"
    with attached(extract(carrier_pc)):
        assert compat.get_current_task() is None  # powercrud's ContextVar stays in-process


@pytest.mark.django_db
@pytest.mark.stack
def test_register_descendant_conflicts_like_powercrud(cache):
    manager = AsyncManager()
    assert compat.register_descendant_conflicts("testapp.Child", [1, 2]) is None  # no task: no-op
    assert manager.check_conflict({"testapp.child": [1, 2]}) == set()
    with compat.task_context("job-r"):
        assert compat.register_descendant_conflicts("testapp.Child", ["3", 4, None]) is None
    # ids coerced with int(), model label normalised, under the task key
    assert manager.check_conflict({"testapp.child": [3, 4]}) == {3, 4}
    assert manager.cache.get("powercrud:conflict:model:testapp.child:3") == "job-r"
    manager.remove_conflict_ids("job-r")
    assert manager.check_conflict({"testapp.child": [3, 4]}) == set()


@pytest.mark.django_db
def test_powercrud_style_save_code_works_unchanged(cache):
    """The pattern from powercrud's planning note, importing from us instead."""
    from otel_taskctx.compat import register_descendant_conflicts, skip_nested_async

    launched, processed = [], []

    def save_children(child_ids):
        if skip_nested_async():
            register_descendant_conflicts("testapp.Child", child_ids)
            processed.extend(child_ids)
        else:
            launched.append(child_ids)

    save_children([1])
    with compat.task_context("job-s"):
        save_children([5, 6])
    assert launched == [[1]] and processed == [5, 6]
    assert AsyncManager().check_conflict({"testapp.child": [5, 6]}) == {5, 6}
