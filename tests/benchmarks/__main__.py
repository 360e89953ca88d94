"""Run benchmarks: ``python -m tests.benchmarks`` (all) or ``python -m tests.benchmarks context``."""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys


def available() -> list[str]:
    here = os.path.dirname(__file__)
    return sorted(
        m.name[len("bench_") :] for m in pkgutil.iter_modules([here]) if m.name.startswith("bench_")
    )


def main(argv: list[str]) -> int:
    names = [a for a in argv if not a.startswith("-")] or available()
    unknown = sorted(set(names) - set(available()))
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; available: {', '.join(available())}")
        return 2
    status = 0
    for name in names:
        print(f"\n=== benchmark: {name}", flush=True)
        module = importlib.import_module(f"tests.benchmarks.bench_{name}")
        status |= module.main([a for a in argv if a.startswith("-")]) or 0
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
