"""Job functions for the reliability tests (tests/test_reliability*.py, tests/test_carriers.py).

Functions only, on the existing ``Parent`` / ``Child`` models. A parent's *save path*
(:func:`save_parent`) is what a real model's ``save()`` does in powercrud-style code: it updates
the parent and launches a nested job for the parent's children, unconditionally; inside a task
the instrumentation runs that launch inline under the task's key. Both happen in one
``transaction.atomic()``, so a parent and its descendants commit together or not at all.

Jobs that must be caught mid-step pause at a *marker*: they write ``<dir>/<name>.reached``
(their pid inside) and wait for ``<dir>/<name>.go``. A marker is passed once: a rerun of the
job (a redelivery) finds ``.reached`` and goes straight on.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from django.db import transaction
from opentelemetry import baggage

MARKER_TIMEOUT = 30.0
NESTED_CHILDREN = "tests.testapp.reliability.update_children"


# --------------------------------------------------------------------------- markers


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # atomic: a reader never sees a half-written file


def wait_for_file(path: Path | str, timeout: float = MARKER_TIMEOUT) -> None:
    path = Path(path)
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout}s")
        time.sleep(0.01)


def pause(marker_dir: str | None, name: str | None) -> bool:
    """Stop at marker ``name`` until the test says go (once per marker). True if it paused."""
    if not marker_dir or not name:
        return False
    reached = Path(marker_dir) / f"{name}.reached"
    if reached.exists():  # a rerun: this point was passed before
        return False
    _write(reached, str(os.getpid()))
    wait_for_file(Path(marker_dir) / f"{name}.go")
    return True


def mark(marker_dir: str, name: str, value: Any = None) -> None:
    _write(Path(marker_dir) / name, json.dumps({"pid": os.getpid(), "value": value}))


# --------------------------------------------------------------------------- context


def seen() -> dict[str, Any]:
    """What this code sees: our identity, powercrud's context, the baggage names."""
    from powercrud.async_context import get_current_task

    from otel_taskctx import current_task

    identity = current_task()
    pc = get_current_task()
    return {
        "task_key": identity.task_key if identity else None,
        "depth": identity.depth if identity else None,
        "root": identity.root_task_key if identity else None,
        "powercrud_task": pc.task_name if pc else None,
        "baggage": sorted(baggage.get_all()),
        "pid": os.getpid(),
    }


# --------------------------------------------------------------------------- parents


def update_children(
    parent_id: int,
    status: str,
    task_key: str | None = None,
    marker_dir: str | None = None,
    pause_at: str | None = None,
    **kwargs: Any,
) -> int:
    """The nested job of a parent: update every child, reporting progress.

    ``pause_at`` pauses after the first child was saved (mid-step, inside the parent's
    transaction).
    """
    from powercrud.async_manager import AsyncManager

    from tests.testapp.models import Child

    children = list(Child.objects.filter(parent_id=parent_id).order_by("pk"))
    for n, child in enumerate(children, 1):
        child.status = status
        child.save(update_fields=["status"])
        if n == 1:
            pause(marker_dir, pause_at)
    if task_key:
        AsyncManager().update_progress(task_key, f"parent {parent_id}: {len(children)} children")
    return len(children)


def save_parent(
    parent: Any, status: str, marker_dir: str | None = None, pause_at: str = ""
) -> None:
    """A parent's save path: its update and its descendants' commit together.

    ``pause_at`` names a marker: ``before-<pk>`` pauses after the parent's own update, before
    its descendants are registered; ``mid-<pk>`` pauses in the nested step after one child.
    """
    from powercrud.async_manager import AsyncManager

    with transaction.atomic():
        parent.status = status
        parent.save(update_fields=["status"])
        if pause_at == f"before-{parent.pk}":
            pause(marker_dir, pause_at)
        child_ids = set(parent.children.values_list("pk", flat=True))
        AsyncManager().launch_async_task(
            NESTED_CHILDREN,
            parent.pk,
            status,
            conflict_ids={"testapp.child": child_ids},
            marker_dir=marker_dir,
            pause_at=pause_at if pause_at == f"mid-{parent.pk}" else None,
        )


def approve_parents(
    parent_ids: list[int],
    status: str = "approved",
    marker_dir: str | None = None,
    pause_at: str = "",
    task_key: str | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """A bulk edit: every parent through its save path, in order."""
    from tests.testapp.models import Parent

    done = []
    for parent in Parent.objects.filter(pk__in=parent_ids).order_by("pk"):
        save_parent(parent, status, marker_dir, pause_at)
        done.append(parent.pk)
    return {"done": done, "seen": seen()}


# --------------------------------------------------------------------------- overlap


def touch_children(
    child_ids: list[int], marker_dir: str, label: str, task_key: str | None = None, **kwargs: Any
) -> int:
    """Nested step holding the children's locks: says so, waits to be released, updates."""
    from tests.testapp.models import Child

    mark(marker_dir, f"{label}.holding", task_key)
    wait_for_file(Path(marker_dir) / f"{label}.release")
    return Child.objects.filter(pk__in=child_ids).update(status=label)


def hold_children(
    child_ids: list[int],
    marker_dir: str,
    label: str,
    others: list[str],
    task_key: str | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """A parent job that reserves ``child_ids`` at the same moment as the ``others``.

    Barrier: write ``<label>.ready``, wait for every ``<other>.ready``, then launch the nested
    step (inline: the reservation raises DescendantConflict if another job holds a child).
    """
    from powercrud.async_manager import AsyncManager

    mark(marker_dir, f"{label}.ready", task_key)
    for other in others:
        wait_for_file(Path(marker_dir) / f"{other}.ready")
    AsyncManager().launch_async_task(
        "tests.testapp.reliability.touch_children",
        child_ids,
        marker_dir,
        label,
        conflict_ids={"testapp.child": set(child_ids)},
    )
    return {"label": label, "seen": seen()}


# --------------------------------------------------------------------------- isolation


_nested_seen: list[dict[str, Any]] = []


def observe_nested(task_key: str | None = None, **kwargs: Any) -> None:
    _nested_seen.append({**seen(), "task_key_kwarg": task_key})


def observe(label: str, fail: bool = False, nested: bool = False, **kwargs: Any) -> dict[str, Any]:
    """Return (or, failing, raise with) what this run saw; ``nested`` launches a nested step."""
    from powercrud.async_manager import AsyncManager

    result: dict[str, Any] = {"label": label, "seen": seen(), "kwarg": kwargs.get("task_key")}
    if nested:
        _nested_seen.clear()
        AsyncManager().launch_async_task("tests.testapp.reliability.observe_nested")
        result["nested"] = list(_nested_seen)
        _nested_seen.clear()
    result["after"] = seen()
    if fail:
        raise RuntimeError("observed " + json.dumps(result, sort_keys=True))
    return result


# --------------------------------------------------------------------------- carriers


def report_context(label: str, register: int = 0, task_key: str | None = None, **kwargs: Any):
    """What the run saw, after optionally registering ``register`` descendants, and the
    carrier a package enqueued from here would get (``otel_taskctx.inject``)."""
    from otel_taskctx import inject, register_descendants

    if register:
        register_descendants("testapp.Child", range(10_000_000, 10_000_000 + register))
    carrier: dict[str, str] = {}
    inject(carrier)
    return {"label": label, "seen": seen(), "kwarg": task_key, "carrier": carrier}
