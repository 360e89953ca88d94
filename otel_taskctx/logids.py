"""How a log line lists many ids: the first few, then how many more."""

from __future__ import annotations

from collections.abc import Hashable, Iterable

#: ids a log line lists at most
MAX_LOGGED_IDS = 10


def _order(value: Hashable) -> tuple[int, object]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (0, value)  # numbers in numeric order
    return (1, str(value))


def format_ids(ids: Iterable[Hashable], limit: int = MAX_LOGGED_IDS) -> str:
    """``[3, 7, 12]``, or for many ids ``[1, 2, ..., 10] and 1,990 more`` (sorted)."""
    items = sorted(ids, key=_order)
    shown = ", ".join(str(i) for i in items[:limit])
    more = len(items) - limit
    return f"[{shown}] and {more:,} more" if more > 0 else f"[{shown}]"
