"""What the demo works with: a job's spec, its report, a refused second job, and the error
that stops the demo."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class DemoFailure(Exception):
    """The demo cannot go on (the reason is the message)."""


@dataclass
class JobSpec:
    """A bulk edit of ``parent_ids`` and how to tell that their descendants followed."""

    title: str
    style: str
    view_class: type
    parent_model: type
    parent_ids: list[int]
    values: dict[str, Any]
    child_model: type
    child_fk: str
    child_done: Callable[[Any], dict[str, Any]]  # field lookups of an updated descendant
    child_time_field: str
    conflict_views: tuple[type, type] | None = None  # (parent view, descendant view)


@dataclass
class Refusal:
    what: str
    ids: list[int]
    refused: bool
    message: str
    holders: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass
class JobReport:
    title: str
    parent_label: str = ""
    child_label: str = ""
    task_key: str = ""
    status: str = "not run"
    ok: bool = False
    duration_s: float = 0.0
    parents: int = 0
    parents_updated: int = 0
    descendants: int = 0
    descendants_inline: int = 0
    descendants_late: int = 0
    escaped_queued: int = 0
    escaped_tasks: int = 0
    escaped_names: list[str] = field(default_factory=list)
    locks_peak: int = 0
    locks_peak_by_model: dict[str, int] = field(default_factory=dict)
    locks_foreign: int = 0
    locks_left: int = 0
    progress_left: str | None = None
    progress_seen: int = 0
    nested_progress_seen: int = 0
    dashboard_status: str = ""
    dashboard_user: str = ""
    #: the dashboard's last progress message of the ended job (powercrud's own final one)
    dashboard_progress: str = ""
    refusals: list[Refusal] = field(default_factory=list)
    tree_text: list[str] = field(default_factory=list)
    tree_summary: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
