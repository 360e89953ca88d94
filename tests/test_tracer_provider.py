"""The global tracer provider stays the host's: otel_taskctx never sets one, and its
processors join the one the host sets, even after ``django.setup()``.

Each case runs in a fresh process (the global provider can be set once per process).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PRELUDE = textwrap.dedent(
    """
    import django
    from django.core.management import call_command
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    django.setup()
    call_command("migrate", verbosity=0)
    from django_q.tasks import async_task
    from otel_taskctx import join_tracer_provider, task_context
    from otel_taskctx.models import TaskSpan
    from otel_taskctx.spans import flush_span_store

    # nobody configured a provider: after django.setup() it is still the API's proxy
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)

    def stored(name):
        flush_span_store(10)
        return TaskSpan.objects.filter(name=name).count()

    def host_span(name):  # the host's own span, made with the API inside a task
        with task_context("host-job-1"):
            with trace.get_tracer("host").start_as_current_span(name):
                pass

    # our own spans (the instrumentation's) are stored on our private provider meanwhile
    async_task("math.floor", 1.5, sync=True)
    assert stored("process math.floor") == 1
    host_span("before the host's provider")
    assert stored("before the host's provider") == 0  # non-recording, as without us

    # the host sets its provider after django.setup(): accepted
    exporter = InMemorySpanExporter()
    mine = TracerProvider()
    mine.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(mine)
    assert trace.get_tracer_provider() is mine
    assert not [k for k in vars(mine) if "taskctx" in k]  # nothing of ours on its objects
    """
)

JOIN_AT_OUR_NEXT_SPAN = PRELUDE + textwrap.dedent(
    """
    async_task("math.floor", 2.5, sync=True)  # our next span: our processors join theirs
    host_span("after our next span")
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "after our next span"]
    assert span.attributes["taskctx.task_key"] == "host-job-1"  # our processor's stamp
    assert stored("after our next span") == 1  # and our store's
    # our spans go to their provider now (their sampler, resource, exporters)
    assert [s.name for s in exporter.get_finished_spans()].count("process math.floor") == 1
    print("ok")
    """
)

JOIN_WITH_THE_ONE_LINER = PRELUDE + textwrap.dedent(
    """
    join_tracer_provider()  # docs/core.md: right after set_tracer_provider
    host_span("after joining")
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "after joining"]
    assert span.attributes["taskctx.task_key"] == "host-job-1"
    assert stored("after joining") == 1
    print("ok")
    """
)


def _run(script: str, tmp_path: Path) -> None:
    env = dict(
        os.environ,
        DJANGO_SETTINGS_MODULE="tests.settings",
        TASKCTX_DB_NAME=str(tmp_path / "host.sqlite3"),
        TASKCTX_TEST_OTEL_TASKCTX="{}",
        PYTHONPATH=str(ROOT),
    )
    env.pop("OTEL_PYTHON_TRACER_PROVIDER", None)
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("ok"), out.stdout + out.stderr
    assert "Overriding of current TracerProvider is not allowed" not in out.stderr


def test_a_provider_set_after_setup_is_the_hosts_and_our_processors_join_it(tmp_path):
    _run(JOIN_AT_OUR_NEXT_SPAN, tmp_path)


def test_join_tracer_provider_joins_at_once(tmp_path):
    _run(JOIN_WITH_THE_ONE_LINER, tmp_path)
