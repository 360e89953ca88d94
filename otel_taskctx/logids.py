"""How a log line lists many ids: the first few (numbers in numeric order), then how many more."""

from __future__ import annotations

from collections.abc import Hashable, Iterable

MAX_LOGGED_IDS = 10


def format_ids(ids: Iterable[Hashable], limit: int = MAX_LOGGED_IDS) -> str:
    """``[3, 7, 12]``, or for many ids ``[1, 2, ..., 10] and 1,990 more``."""
    items = sorted(ids, key=lambda i: (0, i) if type(i) is int else (1, str(i)))
    more = len(items) - limit
    shown = ", ".join(map(str, items[:limit]))
    return f"[{shown}] and {more:,} more" if more > 0 else f"[{shown}]"
