"""powercrud's own async-context tests, rewritten here, run three ways.

The django-powercrud sdist (0.9.16) ships no tests, and powercrud's
``tests/test_async_context.py`` and ``sample/tests/test_async_samples.py`` need its sample
project. These tests check the same behaviours under the same names, each run against:

* ``powercrud``: powercrud's own ``powercrud.async_context`` (the reference);
* ``compat``: the code's imports rewritten to ``otel_taskctx.compat``;
* ``aliased``: the code unchanged, with ``otel_taskctx.compat.install()`` standing in for
  powercrud's module (``sys.modules`` entry and ``powercrud.async_context`` attribute).
"""

from __future__ import annotations

import importlib
import sys
import types
from dataclasses import dataclass
from unittest.mock import patch

import pytest

from otel_taskctx import compat

#: a model module written for powercrud, like powercrud's sample ``Book.save()``
BOOK_MODULE = """
from time import sleep

from {source} import get_current_task, register_descendant_conflicts, skip_nested_async
from powercrud.async_manager import AsyncManager


def save_book(book):
    context = get_current_task()
    in_parent_async = bool(context) and skip_nested_async()
    if in_parent_async and context:
        descendant_ids = list(book.genre_ids)
        if descendant_ids:
            register_descendant_conflicts("sample.Genre", descendant_ids)
        manager = AsyncManager()
        total = len(descendant_ids) if descendant_ids else 5
        for idx in range(1, total + 1):
            sleep(0.2)
            manager.update_progress(
                context.task_name, f"Saving book {{book.pk}}: processed child {{idx}}/{{total}}"
            )
    else:
        sleep(0)
"""


@dataclass
class Way:
    name: str
    source: str  # the module name the code imports from
    module: types.ModuleType  # what ``from powercrud import async_context`` (or ours) gives

    def load(self, template: str, name: str) -> types.ModuleType:
        """Import code written against ``self.source`` as a fresh module."""
        module = types.ModuleType(name)
        sys.modules[name] = module
        try:
            exec(compile(template.format(source=self.source), name, "exec"), vars(module))
        finally:
            del sys.modules[name]
        return module


@pytest.fixture(params=["powercrud", "compat", "aliased"])
def way(request):
    if request.param == "compat":
        yield Way("compat", "otel_taskctx.compat", compat)
        return
    if request.param == "powercrud":
        module = importlib.import_module("powercrud.async_context")
        assert module is not compat and module is compat.powercrud_module()
        yield Way("powercrud", "powercrud.async_context", module)
        return
    compat.install()
    try:
        from powercrud import async_context

        assert async_context is compat
        yield Way("aliased", "powercrud.async_context", async_context)
    finally:
        compat.uninstall()
    assert importlib.import_module("powercrud.async_context") is compat.powercrud_module()


# ------------------------------------------------------- powercrud's tests/test_async_context.py


def test_task_context_sets_and_resets(way):
    async_context = way.module
    assert async_context.get_current_task() is None
    with async_context.task_context("task-123", "module.Manager"):
        current = async_context.get_current_task()
        assert current.task_name == "task-123"
        assert current.manager_class_path == "module.Manager"
        assert async_context.skip_nested_async() is True
    assert async_context.get_current_task() is None
    assert async_context.skip_nested_async() is False


def test_register_descendant_conflicts_without_context(way, monkeypatch):
    called = []

    class DummyManager:
        def add_conflict_ids(self, *args, **kwargs):
            called.append((args, kwargs))

    monkeypatch.setattr("powercrud.async_manager.AsyncManager", lambda: DummyManager())
    way.module.register_descendant_conflicts("sample.Book", [1, 2])
    assert called == []


def test_register_descendant_conflicts_invokes_manager(way, monkeypatch):
    added = {}

    class DummyManager:
        def add_conflict_ids(self, task_name, payload):
            added["task"] = task_name
            added["payload"] = payload

    monkeypatch.setattr("powercrud.async_manager.AsyncManager", lambda: DummyManager())
    # powercrud's sample.Book is testapp.Child here: a model that exists, label normalised
    with way.module.task_context("task-abc"):
        way.module.register_descendant_conflicts("testapp.Child", [1, "2", None])
    assert added["task"] == "task-abc"
    assert added["payload"] == {"testapp.child": {1, 2}}


# ------------------------------------- powercrud's sample/tests/test_async_samples.py (context)


@pytest.fixture
def book_models(way):
    models = way.load(BOOK_MODULE, f"tests._book_models_{way.name}")
    ours = way.name != "powercrud"
    assert (models.get_current_task is compat.get_current_task) is ours
    return models


def test_book_save_streams_progress_inside_context(way, book_models):
    book = types.SimpleNamespace(pk=7, genre_ids=[3])
    with way.module.task_context("demo-task", "sample.async_manager.SampleAsyncManager"):
        with (
            patch.object(book_models, "register_descendant_conflicts") as mock_register,
            patch.object(book_models, "AsyncManager") as mock_manager_cls,
            patch.object(book_models, "sleep", return_value=None),
        ):
            manager_instance = mock_manager_cls.return_value
            book_models.save_book(book)

    mock_register.assert_called_once_with("sample.Genre", [3])
    manager_instance.update_progress.assert_called()
    args, kwargs = manager_instance.update_progress.call_args
    assert args[0] == "demo-task"
    assert "processed child" in args[1]


def test_book_save_without_context_runs_normally(way, book_models):
    book = types.SimpleNamespace(pk=8, genre_ids=[3])
    with (
        patch.object(book_models, "register_descendant_conflicts") as mock_register,
        patch.object(book_models, "AsyncManager") as mock_manager_cls,
        patch.object(book_models, "sleep", return_value=None) as mock_sleep,
    ):
        book_models.save_book(book)

    mock_register.assert_not_called()
    mock_manager_cls.assert_not_called()
    mock_sleep.assert_called()
