"""What the span store costs a job, vs the SDK's BatchSpanProcessor with a no-op exporter.

A job here is a worker run with nested saves, each writing a row (as a real bulk edit does).
Target (issue 5): such a job takes at most 1.5x the baseline's time with the store on (the
spans are written by a background thread, in batches). Also reported: a loop that does
nothing but create spans (the worst case, informational) and the flush at the end of a job.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

from tests.benchmarks._util import table

TARGET = 1.5


class _NoopExporter:
    def export(self, spans):
        from opentelemetry.sdk.trace.export import SpanExportResult

        return SpanExportResult.SUCCESS

    def shutdown(self):
        pass

    def force_flush(self, timeout_millis=30000):
        return True


def _job(tracer, steps: int, work: bool = False) -> None:
    attrs = {"taskctx.task_key": "bench", "taskctx.root_task_key": "bench"}
    with tracer.start_as_current_span("process job", attributes=attrs):
        for n in range(steps):
            with tracer.start_as_current_span("Parent.save", attributes=attrs):
                if work:
                    from tests.testapp.models import Parent

                    Parent.objects.create(name=f"bench-{n}")
                with tracer.start_as_current_span("nested step", attributes=attrs) as span:
                    span.add_event("taskctx.progress", {"taskctx.progress": "1/2"})


def _per_job_ms(tracer, jobs: int, steps: int, repeat: int = 5) -> float:
    results = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(jobs):
            _job(tracer, steps, work=True)
        results.append((time.perf_counter() - start) * 1000 / jobs)
    return statistics.median(results)


def _per_span_ns(tracer, jobs: int, steps: int, repeat: int = 5) -> float:
    spans = jobs * (1 + 2 * steps)
    results = []
    for _ in range(repeat):
        start = time.perf_counter_ns()
        for _ in range(jobs):
            _job(tracer, steps)
        results.append((time.perf_counter_ns() - start) / spans)
    return statistics.median(results)


def main(argv: list[str]) -> int:
    db = os.path.join(tempfile.mkdtemp(prefix="bench-span-store-"), "bench.sqlite3")
    os.environ["TASKCTX_DB_NAME"] = db
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    import django

    django.setup()
    from django.core.management import call_command
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from otel_taskctx.models import TaskSpan
    from otel_taskctx.spans import RunningSpanProcessor, StoreSpanProcessor

    call_command("migrate", verbosity=0)
    quick = "--quick" in argv
    jobs, steps = (20, 10) if quick else (60, 20)

    baseline = TracerProvider()
    baseline.add_span_processor(BatchSpanProcessor(_NoopExporter()))
    base_tracer = baseline.get_tracer("b")

    store_batch = StoreSpanProcessor()
    store = TracerProvider()
    store.add_span_processor(store_batch)
    store.add_span_processor(RunningSpanProcessor())
    tracer = store.get_tracer("s")

    work_jobs = 5 if quick else 15
    _per_job_ms(base_tracer, 2, steps, repeat=1)  # warm up
    base_job = _per_job_ms(base_tracer, work_jobs, steps)
    store_job = _per_job_ms(tracer, work_jobs, steps)
    store_batch.force_flush()
    base_ns = _per_span_ns(base_tracer, jobs // 4, steps)
    store_ns = _per_span_ns(tracer, jobs // 4, steps)

    # the end of a job in a worker: write its spans now (what RunningSpanProcessor triggers)
    flushes = []
    for _ in range(10 if quick else 30):
        _job(tracer, steps)
        start = time.perf_counter()
        store_batch.force_flush()
        flushes.append((time.perf_counter() - start) * 1000)
    store_batch.force_flush()
    rows = TaskSpan.objects.count()
    ratio = store_job / base_job
    span_ratio = store_ns / base_ns
    print(
        table(
            ["case", "baseline", "span store", "ratio", f"<= {TARGET}x"],
            [
                [
                    f"job with {steps} saves (ms/job)",
                    f"{base_job:.2f}",
                    f"{store_job:.2f}",
                    f"{ratio:.2f}x",
                    "yes" if ratio <= TARGET else "NO",
                ],
                [
                    "spans only, no work (ns/span)",
                    f"{base_ns:.0f}",
                    f"{store_ns:.0f}",
                    f"{span_ratio:.2f}x",
                    "(info)",
                ],
            ],
        )
    )
    per_job = 1 + 2 * steps
    print(
        f"flush at job end ({per_job} spans): median {statistics.median(flushes):.1f} ms, "
        f"max {max(flushes):.1f} ms; {rows} rows stored, {store_batch.batch().span_exporter.dropped} dropped"
    )
    store.shutdown()
    baseline.shutdown()
    return 0 if ratio <= TARGET and store_batch.batch().span_exporter.dropped == 0 else 1


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
