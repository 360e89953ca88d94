"""otel_taskctx.compat is a drop-in for powercrud.async_context, backed by the baggage identity."""

import importlib
import inspect
import logging
import sys
import types
import uuid

import pytest
from powercrud import async_context as pc
from powercrud.async_manager import AsyncManager

from otel_taskctx import DescendantConflict, compat, extract, inject, register_descendants
from otel_taskctx.context import attached
from otel_taskctx.logids import format_ids

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


# --------------------------------------------------------------------------- self-contained


def _public(module) -> set[str]:
    return {name for name in vars(module) if not name.startswith("_")}


def _star(module_name: str) -> set[str]:
    namespace: dict = {}
    exec(f"from {module_name} import *", namespace)
    return set(namespace) - {"__builtins__"}


def test_exports_every_public_name_of_powercrud():
    assert _public(pc) <= _public(compat)
    assert _star("powercrud.async_context") <= _star("otel_taskctx.compat")
    assert compat.TaskContext is pc.TaskContext  # the same type: equal, isinstance holds
    for name in _public(pc):
        theirs = getattr(pc, name)
        if getattr(theirs, "__module__", None) == pc.__name__ and callable(theirs):
            assert callable(getattr(compat, name)), name


def test_task_context_without_powercrud(monkeypatch):
    """Without powercrud, compat still imports and answers, with an equal dataclass."""
    import dataclasses
    import importlib.util

    monkeypatch.setitem(sys.modules, "powercrud", None)
    monkeypatch.setitem(sys.modules, "powercrud.async_context", None)
    name = "otel_taskctx._compat_without_powercrud"
    spec = importlib.util.spec_from_file_location(name, compat.__file__)
    alone = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, alone)
    spec.loader.exec_module(alone)

    assert alone.powercrud_module() is None
    assert alone.TaskContext is not pc.TaskContext
    assert [f.name for f in dataclasses.fields(alone.TaskContext)] == [
        "task_name",
        "manager_class_path",
    ]
    with alone.task_context("job-alone", "a.Manager"):
        ctx = alone.get_current_task()
    assert ctx == alone.TaskContext("job-alone", "a.Manager")
    assert repr(ctx) == "TaskContext(task_name='job-alone', manager_class_path='a.Manager')"
    with pytest.raises(ImportError):
        alone.install()


# --------------------------------------------------------------------------- the swap


@pytest.fixture
def restore_powercrud():
    import powercrud

    before = sys.modules["powercrud.async_context"], vars(powercrud).get("async_context")
    yield powercrud
    compat.uninstall()
    sys.modules["powercrud.async_context"] = before[0]
    powercrud.async_context = before[1]


def test_install_serves_compat_as_powercrud_async_context(restore_powercrud):
    powercrud = restore_powercrud
    assert not compat.installed()
    compat.install()
    compat.install()  # again: nothing changes
    assert compat.installed()
    assert importlib.import_module("powercrud.async_context") is compat
    assert powercrud.async_context is compat
    from powercrud.async_context import TaskContext, get_current_task, task_context

    assert get_current_task is compat.get_current_task
    with task_context("job-swap", "module.Manager"):
        assert get_current_task() == TaskContext("job-swap", "module.Manager")
    assert compat.powercrud_module() is pc  # powercrud's own module is still known

    compat.uninstall()
    compat.uninstall()  # again: nothing changes
    assert not compat.installed()
    assert importlib.import_module("powercrud.async_context") is pc
    assert powercrud.async_context is pc


def test_uninstall_undoes_a_swap_by_hand_and_leaves_other_stand_ins(restore_powercrud):
    powercrud = restore_powercrud
    sys.modules["powercrud.async_context"] = compat  # the swap as a project would write it
    powercrud.async_context = compat
    assert compat.installed()
    compat.uninstall()
    assert sys.modules["powercrud.async_context"] is pc and powercrud.async_context is pc

    other = types.ModuleType("powercrud.async_context")
    compat.install()
    sys.modules["powercrud.async_context"] = other  # someone else's, after ours
    powercrud.async_context = other
    compat.uninstall()
    assert sys.modules["powercrud.async_context"] is other and powercrud.async_context is other


# --------------------------------------------------------------------------- the warning


class _Manager:
    def __init__(self, outcome):
        self.outcome = outcome
        self.calls = []

    def add_conflict_ids(self, task_name, payload):
        self.calls.append((task_name, payload))
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


@pytest.mark.parametrize(
    "outcome, warned",
    [
        (None, False),
        (True, False),
        (False, True),
        (DescendantConflict("job-w", {"testapp.child": {3: "other-job"}}), True),
    ],
    ids=["none", "true", "false", "descendant-conflict"],
)
def test_register_descendant_conflicts_warns_only_on_a_conflict(
    outcome, warned, monkeypatch, caplog
):
    manager = _Manager(outcome)
    monkeypatch.setattr("powercrud.async_manager.AsyncManager", lambda: manager)
    with caplog.at_level(logging.WARNING, logger="otel_taskctx.compat"):
        with compat.task_context("job-w"):
            assert compat.register_descendant_conflicts("testapp.Child", [3]) is None
    assert manager.calls == [("job-w", {"testapp.child": {3}})]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert bool(warnings) is warned, warnings
    if isinstance(outcome, DescendantConflict):
        assert "held by task other-job" in warnings[0]


# --------------------------------------------------------------------------- in the worker

_seen: list[dict] = []


def record_both_views(label, **kwargs):
    """A job: what the stand-in, powercrud's own module and the identity say in the run."""
    from powercrud import async_context

    from otel_taskctx import current_task

    identity = current_task()
    _seen.append(
        {
            "stand_in": async_context is compat,
            "compat": async_context.get_current_task(),
            "powercrud": compat.powercrud_module().get_current_task(),
            "depth": identity.depth,
            "parent": identity.parent_task_key,
        }
    )
    return label


@pytest.mark.stack
@pytest.mark.django_db
@pytest.mark.usefixtures("export_spans_after_test")
def test_worker_enters_powercrud_once_under_the_swap(cache, restore_powercrud):
    """The consumer does not enter the stand-in's task_context (that would nest the task in
    itself); powercrud's own module, still held by code imported earlier, is entered."""
    _seen.clear()
    compat.install()
    key = AsyncManager().launch_async_task(f"{__name__}.record_both_views", "swap", sync=True)
    (seen,) = _seen
    assert seen["stand_in"] is True
    assert seen["compat"] == pc.TaskContext(key, "powercrud.async_manager.AsyncManager")
    assert seen["powercrud"] == pc.TaskContext(key, "powercrud.async_manager.AsyncManager")
    assert (seen["depth"], seen["parent"]) == (0, None)
    assert compat.get_current_task() is None and pc.get_current_task() is None


def test_format_ids():
    ids = list(range(1, 2001))
    assert format_ids([]) == "[]"
    assert format_ids({12, 3, 7}) == "[3, 7, 12]"  # numbers in numeric order
    assert format_ids(range(10, 0, -1)) == "[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]"
    assert format_ids(range(11)) == "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9] and 1 more"
    assert format_ids(ids) == "[1, 2, 3, 4, 5, 6, 7, 8, 9, 10] and 1,990 more"
    keys = [uuid.UUID(int=i) for i in range(12)]
    assert format_ids(keys, limit=2) == f"[{keys[0]}, {keys[1]}] and 10 more"
    assert format_ids(["b", "a", 2, 1]) == "[1, 2, a, b]"


@pytest.mark.django_db
@pytest.mark.stack
def test_compat_conflict_warning_lists_ten_ids_of_2000(cache, caplog):
    manager, ids = "powercrud.async_manager.AsyncManager", list(range(1, 2001))
    with compat.task_context("holder-3", manager):
        assert register_descendants("testapp.Child", ids)
    caplog.set_level(logging.WARNING)
    with compat.task_context("other-task", manager):
        compat.register_descendant_conflicts("testapp.Child", ids)
    warnings = [r.getMessage() for r in caplog.records if r.name == "otel_taskctx.compat"]
    assert warnings == [
        "register_descendant_conflicts: some testapp.child ids "
        "[1, 2, 3, 4, 5, 6, 7, 8, 9, 10] and 1,990 more are locked by another task"
    ]
