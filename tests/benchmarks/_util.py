"""Shared helpers for benchmarks: Django set-up, a stack's run in a child process and a
plain-text table."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence


def setup_django(settings_module: str = "tests.settings") -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", settings_module)
    import django

    django.setup()


def run_child(module: str, stack: str, tag: str, *args: str) -> dict | None:
    """Run ``python -m module --stack=stack --child=1 *args`` (a fresh process per stack, so
    its settings are read anew) and return the JSON it printed after ``tag``; None, with its
    output printed, when it failed."""
    env = {k: v for k, v in os.environ.items() if k not in ("TASKCTX_STACK", "TASKCTX_DB_NAME")}
    proc = subprocess.run(
        [sys.executable, "-m", module, f"--stack={stack}", "--child=1", *args],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(tag)]
    if proc.returncode or not lines:
        print(proc.stdout[-3000:])
        print(f"{stack}: benchmark failed (exit {proc.returncode})")
        return None
    return json.loads(lines[-1][len(tag) :])


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
