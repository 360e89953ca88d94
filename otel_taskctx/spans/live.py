"""Which running spans the store's writer records early, so a live job shows its current step.

A span gets a "running" row only once it has run ``running_delay`` seconds (1 s): short spans
cost one write, not two. In a long job made of short steps (a bulk edit saving one object after
another, each save well under a second), that leaves the job's run as the only running row, and
the viewer could not say which step the job is in. So, once a span has its running row and is
still open, the spans open *under* it are recorded at the writer's next pass (every half
second), whatever their age; the cascade reaches the deepest step open at that moment. The
extra rows per pass are the job's open chain (a handful), not one per span.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

Key = tuple[int, int]


def _key(span: Any) -> Key | None:
    ctx = getattr(span, "context", None)
    return None if ctx is None else (ctx.trace_id, ctx.span_id)


class LiveSpans:
    """Open spans that have a running row (kept until they end)."""

    def __init__(self) -> None:
        self._open: dict[Key, Any] = {}

    def __len__(self) -> int:
        return len(self._open)

    def __contains__(self, span: Any) -> bool:
        return _key(span) in self._open

    def add(self, spans: Iterable[Any]) -> None:
        """Spans whose running row is being written."""
        for span in spans:
            key = _key(span)
            if key is not None and span.end_time is None:
                self._open[key] = span

    def prune(self) -> None:
        for key, span in list(self._open.items()):
            if span.end_time is not None:
                del self._open[key]

    def open_under(self, tracked: Iterable[Any]) -> list[Any]:
        """Spans of ``tracked`` (in start order) still open under a span with a running row;
        they count as having one from now on."""
        found = []
        for span in tracked:
            key = _key(span)
            if key is None or span.end_time is not None or key in self._open:
                continue
            parent = getattr(span, "parent", None)
            if parent is not None and (parent.trace_id, parent.span_id) in self._open:
                self._open[key] = span  # its own children follow it in start order
                found.append(span)
        return found
