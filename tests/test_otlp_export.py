"""Standard OTLP export: with ``OTEL_TRACES_EXPORTER`` / ``OTEL_EXPORTER_OTLP_*`` the same spans
go to a collector. A local OTLP/HTTP endpoint (started here) decodes what arrives."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from django.db import connection
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otel_taskctx.spans.store import (
    STORE,
    install_env_exporters,
    requested_exporters,
)
from otel_taskctx.tracer_provider import (
    added_processors,
    create_sdk_tracer_provider,
    created_here,
)

REPO = Path(__file__).resolve().parent.parent


class Collector:
    """An OTLP/HTTP receiver on 127.0.0.1 (free port): decoded spans with their service."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.requests = 0
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server API
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                collector.add(request)
                payload = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, request: ExportTraceServiceRequest) -> None:
        with self.lock:
            self.requests += 1
            for resource_spans in request.resource_spans:
                resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append(
                            {
                                "name": span.name,
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent_span_id": span.parent_span_id.hex(),
                                "kind": span.kind,
                                "status": span.status.code,
                                "attributes": {a.key: _value(a.value) for a in span.attributes},
                                "events": [e.name for e in span.events],
                                "service": resource.get("service.name"),
                            }
                        )

    def snapshot(self) -> list[dict]:
        with self.lock:
            return list(self.spans)

    def __enter__(self) -> Collector:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def _value(any_value):
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


# --------------------------------------------------------------------------- configuration


def test_which_exporters_the_environment_asks_for():
    assert requested_exporters({}) == []
    assert requested_exporters({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"}) == ["otlp"]
    assert requested_exporters({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://x/v1/traces"}) == [
        "otlp"
    ]
    assert requested_exporters({"OTEL_TRACES_EXPORTER": "otlp,console"}) == ["otlp", "console"]
    assert (
        requested_exporters(
            {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"}
        )
        == []
    )


def test_env_exporters_only_on_a_provider_nobody_else_configured():
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}
    ours = create_sdk_tracer_provider()  # as ready() creates it when none was configured
    assert install_env_exporters(env, provider=ours) == ["otlp"]
    assert install_env_exporters(env, provider=ours) == []  # once
    (processor,) = added_processors(ours).values()
    assert isinstance(processor, BatchSpanProcessor)
    assert isinstance(processor.span_exporter, OTLPSpanExporter)
    ours.shutdown()

    theirs = TracerProvider()  # the application's own exporter: leave it alone
    exporter = InMemorySpanExporter()
    theirs.add_span_processor(SimpleSpanProcessor(exporter))
    assert install_env_exporters(env, provider=theirs) == []
    assert added_processors(theirs) == {}
    theirs.get_tracer("t").start_span("s").end()
    assert [s.name for s in exporter.get_finished_spans()] == ["s"]
    assert install_env_exporters(env, provider=TracerProvider()) == []  # theirs, if empty
    assert install_env_exporters({}, provider=create_sdk_tracer_provider()) == []


def test_a_provider_otel_taskctx_created_counts_as_unconfigured_with_our_processors():
    from otel_taskctx.tracer_provider import add_span_processor_once

    provider = create_sdk_tracer_provider()
    assert created_here(provider)
    processor = SimpleSpanProcessor(InMemorySpanExporter())
    assert add_span_processor_once(STORE, lambda: processor, provider=provider) is processor
    assert created_here(provider)
    assert not created_here(TracerProvider())


def test_spans_arrive_on_a_local_otlp_endpoint():
    with Collector() as collector:
        provider = create_sdk_tracer_provider()
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # the OTLP exporter reads its endpoint from the environment
        try:
            assert install_env_exporters(env, provider=provider) == ["otlp"]
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        tracer = provider.get_tracer("t")
        with tracer.start_as_current_span("parent"):
            with tracer.start_as_current_span("child"):
                pass
        provider.force_flush()
        provider.shutdown()
        spans = {s["name"]: s for s in collector.snapshot()}
    assert spans["child"]["parent_span_id"] == spans["parent"]["span_id"]
    assert spans["child"]["trace_id"] == spans["parent"]["trace_id"]


# --------------------------------------------------------------------------- end to end

PRODUCER = textwrap.dedent(
    """
    import json, sys
    import django
    django.setup()
    from powercrud.async_manager import AsyncManager
    from otel_taskctx.spans import flush_span_store

    ids = json.loads(sys.argv[1])
    key = AsyncManager().launch_async_task(
        "tests.testapp.tasks.approve_invoices", ids, conflict_ids={"testapp.invoice": set(ids)}
    )
    flush_span_store()
    print(key, flush=True)
    """
)


@pytest.mark.cluster
@pytest.mark.stack
@pytest.mark.django_db(transaction=True)
def test_job_tree_arrives_intact_across_the_producer_worker_boundary():
    from django.core.cache import caches
    from django_q.models import Task

    from otel_taskctx.models import TaskSpan
    from tests.cluster import run_cluster
    from tests.testapp.models import Invoice, InvoiceLine

    caches["default"].clear()
    ids = []
    for i in range(2):
        invoice = Invoice.objects.create(number=f"INV-{i}")
        InvoiceLine.objects.bulk_create(InvoiceLine(invoice=invoice) for _ in range(2))
        ids.append(invoice.pk)
    with Collector() as collector:
        otel_env = {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "200",
        }
        # the cluster configures no tracing itself, so otel_taskctx's private provider gets
        # the OTLP exporter the environment asks for
        with run_cluster(
            span_dir=None,
            env={
                **otel_env,
                "TASKCTX_NO_PROVIDER": "1",
                "OTEL_SERVICE_NAME": "worker",
                "DJANGO_SETTINGS_MODULE": "tests.settings",
            },
        ) as cluster:
            env = {
                **os.environ,
                **otel_env,
                "OTEL_SERVICE_NAME": "web",
                "TASKCTX_DB_NAME": connection.settings_dict["NAME"],
                "DJANGO_SETTINGS_MODULE": "tests.settings",
                "PYTHONPATH": str(REPO),
            }
            out = subprocess.run(
                [sys.executable, "-c", PRODUCER, json.dumps(ids)],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert out.returncode == 0, out.stderr
            key = out.stdout.strip().splitlines()[-1]
            task = cluster.wait_for(lambda: Task.objects.filter(name=key).first(), what="the job")
            assert task.success, task.result

            def arrived():
                spans = collector.snapshot()
                names = [s["name"] for s in spans]
                kinds = {s["kind"] for s in spans}
                # the job's CONSUMER span ends after its steps and may come in a later batch
                return (
                    names.count("tests.testapp.tasks.update_invoice_lines") == 2
                    and 4 in kinds  # SPAN_KIND_PRODUCER
                    and 5 in kinds  # SPAN_KIND_CONSUMER
                    and spans
                )

            spans = cluster.wait_for(arrived, timeout=30, what="spans at the OTLP endpoint")
    producer = next(s for s in spans if s["kind"] == 4)  # PRODUCER
    consumer = next(s for s in spans if s["kind"] == 5)  # CONSUMER
    steps = [s for s in spans if s["name"] == "tests.testapp.tasks.update_invoice_lines"]
    assert producer["service"] == "web" and consumer["service"] == "worker"
    assert producer["attributes"]["taskctx.launched_task_key"] == key
    # the tree is intact: the worker's run hangs under the web process's enqueue span
    assert consumer["trace_id"] == producer["trace_id"]
    assert consumer["parent_span_id"] == producer["span_id"]
    assert consumer["attributes"]["taskctx.task_key"] == key
    for step in steps:
        assert step["trace_id"] == producer["trace_id"]
        assert step["parent_span_id"] == consumer["span_id"]
        assert "taskctx.descendants" in step["events"]
    # the very same spans were stored for the viewer
    stored = set(TaskSpan.objects.filter(root_task_key=key).values_list("span_id", flat=True))
    assert {producer["span_id"], consumer["span_id"], *(s["span_id"] for s in steps)} <= stored
