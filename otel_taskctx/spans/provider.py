"""Putting the span store (and the standard OTLP exporter) on the tracer providers we use.

``install_span_store()`` runs from the app's ``ready()`` when ``OTEL_TASKCTX["SPAN_STORE"]`` is
true. Its processors join the host's SDK provider (set before or after ``django.setup()``) or
otel_taskctx's private one (see :mod:`otel_taskctx.tracer_provider`); it never sets a global
provider and never replaces an exporter the application set up.

``install_env_exporters()`` honours the standard ``OTEL_TRACES_EXPORTER`` /
``OTEL_EXPORTER_OTLP_*`` environment variables, but only on otel_taskctx's private provider
(used while the host has none): a provider set up by the application or by
``opentelemetry-instrument`` already exports what those variables ask for.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

from otel_taskctx.spans.exporter import RunningSpanProcessor, StoreSpanProcessor
from otel_taskctx.spans.flushing import ENV_PREFIX, RUNNING, STORE, connect_flush_signals
from otel_taskctx.tracer_provider import (
    add_span_processor_once,
    added_processors,
    created_here,
    host_tracer_provider,
)

log = logging.getLogger("otel_taskctx.spans")


def install_span_store() -> bool:
    """Store spans in the database. Returns False when the OpenTelemetry SDK is missing.

    No thread starts here: the writer's starts with the first span of the process that uses it.
    """
    store = add_span_processor_once(STORE, StoreSpanProcessor, create=False)
    if store is None:
        log.info("otel_taskctx: no OpenTelemetry SDK; spans are not stored")
        return False
    add_span_processor_once(RUNNING, RunningSpanProcessor, create=False)
    host = host_tracer_provider()
    if host is not None and not hasattr(host, "add_span_processor"):
        log.info("otel_taskctx: the tracer provider is not the SDK's; spans are not stored")
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

    Without ``provider``: to otel_taskctx's private provider (made when it is set up, at our
    first span), and nothing when the host has a provider of its own. With ``provider``: only
    if otel_taskctx created it.
    """
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    env = dict(os.environ if environ is None else environ)
    names = requested_exporters(env)
    if not names:
        return []
    if provider is None:
        if host_tracer_provider() is not None:
            log.debug("otel_taskctx: the host configured a tracer provider; not adding %s", names)
            return []
        return _register_private_exporters(names, env)
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


def _register_private_exporters(names: list[str], env: dict[str, str]) -> list[str]:
    """The exporters for our private provider; their processors are made when it is set up
    (at our first span: a batch processor's thread starts in the process that makes spans)."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    added = []
    for name in names:
        exporter = _make_exporter(name, env)
        if exporter is None:
            continue
        kind = SimpleSpanProcessor if name == "console" else BatchSpanProcessor
        add_span_processor_once(
            ENV_PREFIX + name,
            functools.partial(kind, exporter),
            create=False,
            private_only=True,
        )
        added.append(name)
    return added
