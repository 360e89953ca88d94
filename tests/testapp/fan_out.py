"""Job functions for tests/test_fan_out.py: a parent that fans out children to other workers."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from otel_taskctx import fan_out, run_inline

CHILD = "tests.testapp.fan_out.fan_child"
MARKED_CHILD = "tests.testapp.fan_out.marked_child"
INLINE_CHILD = "tests.testapp.fan_out.inline_child"


def _write(marker_dir: str, name: str, data: dict[str, Any]) -> None:
    path = Path(marker_dir) / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def fan_parent(
    label: str,
    groups: list[list[int]],
    marker_dir: str,
    sleep: float = 0.5,
    fail_child: int | None = None,
    pause_child: int | None = None,
    parent_id: int | None = None,
    child_options: dict[int, dict[str, Any]] | None = None,
    task_key: str | None = None,
    child: str = CHILD,
    **kwargs: Any,
) -> bool:
    """Launches one nested job per group of children (fanned out), then ends. With
    ``parent_id``, it runs in one transaction that first approves that parent (as powercrud's
    bulk update does) and the children record the parent's status they see."""
    from django.db import transaction

    with transaction.atomic():
        if parent_id is not None:
            from tests.testapp.models import Parent

            Parent.objects.filter(pk=parent_id).update(status="approved")
        from powercrud.async_manager import AsyncManager

        for n, ids in enumerate(groups):  # one nested launch per group
            AsyncManager().launch_async_task(
                child,
                f"{label}-{n}",
                ids,
                marker_dir,
                sleep,
                fail=(n == fail_child),
                pause_at=f"{label}-{n}-pause" if n == pause_child else None,
                parent_id=parent_id,
                conflict_ids={"testapp.child": set(ids)},
                **(child_options or {}).get(n, {}),
            )
        time.sleep(0.3 if parent_id is not None else 0)  # children must wait for the commit
    _write(marker_dir, f"{label}-parent", {"ended": time.time(), "pid": os.getpid()})
    return True


def fan_child(
    label: str,
    ids: list[int],
    marker_dir: str,
    sleep: float,
    fail: bool = False,
    pause_at: str | None = None,
    parent_id: int | None = None,
    grandchild: list[int] | None = None,
    return_false: bool = False,
    task_key: str | None = None,
    **kwargs: Any,
) -> int | bool:
    """A fanned-out child: says who it is and what it holds, works a while, ends.

    ``pause_at`` names a marker (see tests.testapp.reliability.pause) to stop at once;
    ``grandchild`` ids: the child fans out a child of its own for them; ``return_false``: the
    child reports failure the powercrud way."""
    from otel_taskctx import report_progress
    from tests.testapp.reliability import pause

    pause(marker_dir, pause_at)
    report_progress(f"child {label} working")
    if grandchild:
        from powercrud.async_manager import AsyncManager

        AsyncManager().launch_async_task(
            CHILD,
            f"{label}-grand",
            grandchild,
            marker_dir,
            sleep * 2,
            conflict_ids={"testapp.child": set(grandchild)},
        )
    from otel_taskctx import current_task, get_conflict_store
    from otel_taskctx.descendants import resolve_manager

    identity = current_task()
    held = {}
    if identity is not None:
        store = get_conflict_store(resolve_manager(identity))
        held = {
            str(k): v
            for k, v in store.holders({"testapp.child": ids}).get("testapp.child", {}).items()
        }
    start = time.time()
    time.sleep(sleep)
    if fail:
        raise ValueError(f"{label} failed on purpose")
    if return_false:
        return False
    _write(
        marker_dir,
        label,
        {
            "start": start,
            "end": time.time(),
            "pid": os.getpid(),
            "held": held,
            "task_key": identity.task_key if identity else None,
            "depth": identity.depth if identity else None,
            "task_key_kwarg": task_key,
            "parent_status": _parent_status(parent_id),
        },
    )
    return len(ids)


def _parent_status(parent_id: int | None) -> str | None:
    if parent_id is None:
        return None
    from tests.testapp.models import Parent

    return Parent.objects.get(pk=parent_id).status


@fan_out
def marked_child(*args: Any, **kwargs: Any) -> int | bool:
    """:func:`fan_child`, fanned out by its decorator (whatever the settings say)."""
    return fan_child(*args, **kwargs)


@run_inline
def inline_child(*args: Any, **kwargs: Any) -> int | bool:
    """:func:`fan_child`, run inline by its decorator (whatever the settings say)."""
    return fan_child(*args, **kwargs)
