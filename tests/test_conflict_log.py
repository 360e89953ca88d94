"""A conflict warning lists at most 10 ids, then how many more (powercrud's line and ours)."""

from __future__ import annotations

import logging
import uuid

import pytest
from powercrud.async_manager import AsyncManager

from otel_taskctx import compat, register_descendants, task_context
from otel_taskctx.logids import format_ids

pytestmark = [pytest.mark.django_db, pytest.mark.stack]
MANAGER = "powercrud.async_manager.AsyncManager"
IDS = list(range(1, 2001))


def warnings_of(caplog, logger: str) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == logger and r.levelno == logging.WARNING
    ]


def test_format_ids():
    assert format_ids([]) == "[]"
    assert format_ids({12, 3, 7}) == "[3, 7, 12]"  # numbers in numeric order
    assert format_ids(range(10, 0, -1)) == "[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]"
    assert format_ids(range(11)) == "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9] and 1 more"
    assert format_ids(IDS) == "[1, 2, 3, 4, 5, 6, 7, 8, 9, 10] and 1,990 more"
    keys = [uuid.UUID(int=i) for i in range(12)]
    assert format_ids(keys, limit=2) == f"[{keys[0]}, {keys[1]}] and 10 more"
    assert format_ids(["b", "a", 2, 1]) == "[1, 2, a, b]"


def test_powercrud_conflict_warning_lists_ten_ids_of_2000(cache, caplog):
    with task_context("holder-1", MANAGER):
        assert register_descendants("testapp.Child", IDS)
    caplog.set_level(logging.DEBUG)
    conflicts = AsyncManager().check_conflict({"testapp.child": IDS})
    assert conflicts == set(IDS)  # powercrud's result is untouched
    assert warnings_of(caplog, "powercrud.async_manager") == [
        "Conflict detected with IDs [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] and 1,990 more"
    ]
    assert max(len(r.getMessage()) for r in caplog.records) < 200


def test_powercrud_conflict_warning_with_few_ids_lists_them_all(cache, caplog):
    with task_context("holder-2", MANAGER):
        assert register_descendants("testapp.Child", [4, 9])
    caplog.set_level(logging.DEBUG)
    assert AsyncManager().check_conflict({"testapp.child": [1, 4, 9]}) == {4, 9}
    assert warnings_of(caplog, "powercrud.async_manager") == ["Conflict detected with IDs [4, 9]"]
    # no conflict: no warning at all, as in powercrud
    caplog.clear()
    assert AsyncManager().check_conflict({"testapp.child": [1, 2]}) == set()
    assert warnings_of(caplog, "powercrud.async_manager") == []


def test_compat_conflict_warning_lists_ten_ids_of_2000(cache, caplog):
    with task_context("holder-3", MANAGER):
        assert register_descendants("testapp.Child", IDS)
    caplog.set_level(logging.WARNING)
    with compat.task_context("other-task", MANAGER):
        compat.register_descendant_conflicts("testapp.Child", IDS)
    assert warnings_of(caplog, "otel_taskctx.compat") == [
        "register_descendant_conflicts: some testapp.child ids "
        "[1, 2, 3, 4, 5, 6, 7, 8, 9, 10] and 1,990 more are locked by another task"
    ]


def test_uninstrument_gives_back_powercrud_s_own_line(cache, caplog):
    from opentelemetry.instrumentation.taskctx import TaskContextInstrumentor

    def our_filters():
        return [f for f in logging.getLogger("powercrud.async_manager").filters]

    assert len(our_filters()) == 1
    wrapper = vars(AsyncManager)["check_conflict"]
    with task_context("holder-4", MANAGER):
        assert register_descendants("testapp.Child", range(1, 13))
    caplog.set_level(logging.WARNING)
    instrumentor = TaskContextInstrumentor()
    instrumentor.uninstrument()
    try:
        assert vars(AsyncManager)["check_conflict"] is wrapper.__wrapped__
        assert our_filters() == []
        AsyncManager().check_conflict({"testapp.child": list(range(1, 13))})
        assert warnings_of(caplog, "powercrud.async_manager") == [
            f"Conflict detected with IDs {set(range(1, 13))}"
        ]
    finally:
        instrumentor.instrument()
    assert vars(AsyncManager)["check_conflict"] is not wrapper.__wrapped__
    assert len(our_filters()) == 1
    caplog.clear()  # capped again, once
    AsyncManager().check_conflict({"testapp.child": list(range(1, 13))})
    assert warnings_of(caplog, "powercrud.async_manager") == [
        "Conflict detected with IDs [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] and 2 more"
    ]
