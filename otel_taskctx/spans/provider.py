"""The standard ``OTEL_TRACES_EXPORTER`` / ``OTEL_EXPORTER_OTLP_*`` exporters, on otel_taskctx's
private provider only: a provider the application (or ``opentelemetry-instrument``) set up
already exports what those variables ask for."""

from __future__ import annotations

import functools
import logging
import os
from importlib.metadata import entry_points
from typing import Any

from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

from otel_taskctx.spans.store import ENV_PREFIX
from otel_taskctx.tracer_provider import (
    add_span_processor_once,
    added_processors,
    created_here,
    host_tracer_provider,
)

log = logging.getLogger("otel_taskctx.spans")


def provider_is_unconfigured(provider: Any) -> bool:
    """True when otel_taskctx created ``provider`` (whatever processors it added since)."""
    return created_here(provider)


def requested_exporters(environ: dict[str, str] | None = None) -> list[str]:
    """Exporter names from ``OTEL_TRACES_EXPORTER`` (default: ``otlp`` when an OTLP endpoint
    is set, else none)."""
    env = os.environ if environ is None else environ
    value = env.get("OTEL_TRACES_EXPORTER")
    if value is None:
        endpoint = "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
        return ["otlp"] if any(env.get(name) for name in endpoint) else []
    names = [n.strip().lower() for n in value.split(",") if n.strip()]
    return [n for n in names if n != "none"]


def _processor(name: str, env: dict[str, str]) -> Any | None:
    """A processor for the exporter ``name`` (an ``opentelemetry_traces_exporter`` entry
    point; ``otlp`` is ``otlp_proto_http``, or ``otlp_proto_grpc`` with that protocol)."""
    if name == "otlp":
        protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
            "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
        )
        name = "otlp_proto_grpc" if protocol == "grpc" else "otlp_proto_http"
    try:
        exporter = next(iter(entry_points(group="opentelemetry_traces_exporter", name=name)))
        exporter = exporter.load()()
    except Exception as exc:
        log.warning(
            "otel_taskctx: could not make span exporter %r for OTEL_TRACES_EXPORTER (%s); "
            "for OTLP: pip install 'otel-taskctx[otlp]'",
            name,
            "not installed" if isinstance(exc, StopIteration) else exc,
        )
        return None
    kind = SimpleSpanProcessor if name == "console" else BatchSpanProcessor
    return functools.partial(kind, exporter)


def install_env_exporters(environ: dict[str, str] | None = None, provider: Any = None) -> list[str]:
    """Add the exporters the environment names; returns their names.

    Without ``provider``: to otel_taskctx's private provider (their processors are made when
    it is set up, at our first span), and nothing when the host has a provider of its own.
    With ``provider``: only if otel_taskctx created it.
    """
    env = dict(os.environ if environ is None else environ)
    names = requested_exporters(env)
    if provider is None and host_tracer_provider() is not None:
        return []
    if provider is not None and not provider_is_unconfigured(provider):
        return []
    added = []
    for name in names:
        if ENV_PREFIX + name in added_processors(provider):
            continue
        factory = _processor(name, env)
        if factory is not None:
            add_span_processor_once(
                ENV_PREFIX + name,
                factory,
                create=False,
                provider=provider,
                private_only=provider is None,
            )
            added.append(name)
    return added
