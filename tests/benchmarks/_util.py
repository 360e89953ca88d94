"""Shared helpers for benchmarks: Django set-up and a plain-text table."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence


def setup_django(settings_module: str = "tests.settings") -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", settings_module)
    import django

    django.setup()


def per_call_ns(func: Callable[[], object], number: int = 200_000, repeat: int = 7) -> float:
    """Median over ``repeat`` runs of the per-call time of ``func`` in nanoseconds."""
    results = []
    for _ in range(repeat):
        start = time.perf_counter_ns()
        for _ in range(number):
            func()
        results.append((time.perf_counter_ns() - start) / number)
    return statistics.median(results)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append(
            "  ".join(
                c.ljust(w) if n == 0 or i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
