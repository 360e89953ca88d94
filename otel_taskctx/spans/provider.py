"""Putting the span store (and the standard OTLP exporter) on the tracer provider.

``install_span_store()`` runs from the app's ``ready()`` when ``OTEL_TASKCTX["SPAN_STORE"]`` is
true. It adds processors to the SDK provider (creating one only if none was configured) and
never replaces an exporter the application set up.

``install_env_exporters()`` honours the standard ``OTEL_TRACES_EXPORTER`` /
``OTEL_EXPORTER_OTLP_*`` environment variables, but only on a provider that otel_taskctx
created (nobody configured one before Django started): a provider set up by the application
or by ``opentelemetry-instrument`` already exports what those variables ask for.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

from otel_taskctx.spans.exporter import DatabaseSpanExporter, RunningSpanProcessor
from otel_taskctx.spans.flushing import (
    ENV_PREFIX,
    RUNNING,
    STORE,
    STORE_SCHEDULE_DELAY_MS,
    connect_flush_signals,
)
from otel_taskctx.tracer_provider import (
    add_span_processor_once,
    added_processors,
    created_here,
    sdk_tracer_provider,
)

log = logging.getLogger("otel_taskctx.spans")


def install_span_store() -> bool:
    """Store spans in the database. Returns False when there is no SDK tracer provider."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    store = add_span_processor_once(
        STORE,
        lambda: BatchSpanProcessor(
            DatabaseSpanExporter(), schedule_delay_millis=STORE_SCHEDULE_DELAY_MS
        ),
    )
    if store is None:
        log.info("otel_taskctx: no OpenTelemetry SDK tracer provider; spans are not stored")
        return False
    add_span_processor_once(RUNNING, RunningSpanProcessor)
    connect_flush_signals()
    return True


def provider_is_unconfigured(provider: Any) -> bool:
    """True when otel_taskctx created ``provider`` (nobody else configured one), whatever
    processors otel_taskctx has added to it since."""
    return created_here(provider)


def requested_exporters(environ: dict[str, str] | None = None) -> list[str]:
    """Exporter names from ``OTEL_TRACES_EXPORTER`` (default: ``otlp`` when an OTLP endpoint
    is set, else none)."""
    env = os.environ if environ is None else environ
    value = env.get("OTEL_TRACES_EXPORTER")
    if value is None:
        if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
            return ["otlp"]
        return []
    names = [n.strip().lower() for n in value.split(",") if n.strip()]
    return [n for n in names if n != "none"]


def _make_exporter(name: str, env: dict[str, str]) -> Any | None:
    if name in ("otlp", "otlp_proto_http"):
        protocol = (
            env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "http/protobuf"
        )
        if name == "otlp" and protocol == "grpc":
            name = "otlp_proto_grpc"
        else:
            if protocol not in ("http/protobuf",):
                log.warning(
                    "otel_taskctx: OTLP protocol %r is not supported here; using http/protobuf",
                    protocol,
                )
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                    OTLPSpanExporter,
                )
            except ImportError:
                log.warning(
                    "otel_taskctx: OTEL_TRACES_EXPORTER asks for OTLP but "
                    "opentelemetry-exporter-otlp-proto-http is not installed "
                    "(pip install 'otel-taskctx[otlp]')"
                )
                return None
            return OTLPSpanExporter()
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    try:
        from importlib.metadata import entry_points

        for entry in entry_points(group="opentelemetry_traces_exporter", name=name):
            return entry.load()()
    except Exception as exc:
        log.warning("otel_taskctx: could not load span exporter %r: %s", name, exc)
        return None
    log.warning("otel_taskctx: unknown span exporter %r in OTEL_TRACES_EXPORTER", name)
    return None


def install_env_exporters(environ: dict[str, str] | None = None, provider: Any = None) -> list[str]:
    """Add the exporters named by the standard environment variables; returns their names.

    Does nothing on a provider configured by someone else.
    """
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    env = dict(os.environ if environ is None else environ)
    names = requested_exporters(env)
    if not names:
        return []
    if provider is None:
        provider = sdk_tracer_provider(create=True)
        if provider is None:
            return []
    if not provider_is_unconfigured(provider):
        log.debug(
            "otel_taskctx: the tracer provider was configured elsewhere; not adding %s", names
        )
        return []
    added = []
    for name in names:
        key = ENV_PREFIX + name
        if key in added_processors(provider):
            continue
        exporter = _make_exporter(name, env)
        if exporter is None:
            continue
        kind = SimpleSpanProcessor if name == "console" else BatchSpanProcessor
        add_span_processor_once(key, functools.partial(kind, exporter), provider=provider)
        added.append(name)
    return added
