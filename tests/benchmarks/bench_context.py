"""Cost per call of ``skip_nested_async()`` / ``current_task()`` vs powercrud's ContextVar helper.

Target (issue 7): within 3x of powercrud's ``async_context.skip_nested_async``.
"""

from __future__ import annotations

from tests.benchmarks._util import per_call_ns, setup_django, table

TARGET = 3.0


def main(argv: list[str]) -> int:
    setup_django()
    from opentelemetry import baggage
    from powercrud import async_context as pc

    from otel_taskctx import current_task, extract, inject, skip_nested_async, task_context
    from otel_taskctx.context import attached
    from otel_taskctx.identity import BAGGAGE_ENTRY

    number = 50_000 if "--quick" in argv else 200_000
    rows = []

    def measure(label, ours, theirs_ns):
        ns = per_call_ns(ours, number)
        ratio = ns / theirs_ns
        rows.append(
            [
                label,
                f"{theirs_ns:.0f}",
                f"{ns:.0f}",
                f"{ratio:.2f}x",
                "yes" if ratio <= TARGET else "NO",
            ]
        )
        return ratio

    base_out = per_call_ns(pc.skip_nested_async, number)
    ratios = [measure("skip_nested_async, no task", skip_nested_async, base_out)]
    ratios.append(measure("current_task, no task", current_task, base_out))
    with pc.task_context("job"):
        base_in = per_call_ns(pc.skip_nested_async, number)
    with task_context("job"):
        ratios.append(measure("skip_nested_async, task_context", skip_nested_async, base_in))
        ratios.append(measure("current_task, task_context", current_task, base_in))
        carrier: dict[str, str] = {}
        inject(carrier)
    with attached(extract(carrier)):  # what a worker sees
        ratios.append(measure("skip_nested_async, extracted in worker", skip_nested_async, base_in))
    token = carrier["baggage"].split(",")[0].split("=", 1)[1]
    with attached(baggage.set_baggage(BAGGAGE_ENTRY, token)):
        # raw baggage that bypassed extract(): verified once, then served from the LRU cache
        measure("skip_nested_async, raw baggage (LRU)", skip_nested_async, base_in)
    print(
        table(
            ["case", "powercrud ns/call", "otel_taskctx ns/call", "ratio", f"<= {TARGET:.0f}x"],
            rows,
        )
    )
    print("(raw baggage is informational: workers and task_context never take that path)")
    return 0 if all(r <= TARGET for r in ratios) else 1
