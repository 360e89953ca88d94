"""Putting the span store (and the standard OTLP exporter) on the tracer provider.

``install_span_store()`` runs from the app's ``ready()`` when ``OTEL_TASKCTX["SPAN_STORE"]`` is
true. It adds processors to the SDK provider (creating one only if none was configured) and
never replaces an exporter the application set up.

``install_env_exporters()`` honours the standard ``OTEL_TRACES_EXPORTER`` /
``OTEL_EXPORTER_OTLP_*`` environment variables, but only on a provider that nobody else
configured (one that holds no span processor but ours): a provider set up by the application
or by ``opentelemetry-instrument`` already exports what those variables ask for.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from otel_taskctx._process import current_pid
from otel_taskctx.tracing import _MARK, add_span_processor_once, sdk_tracer_provider

log = logging.getLogger("otel_taskctx.spans")

STORE = "otel_taskctx.span_store"
RUNNING = "otel_taskctx.span_store.running"
ENV_PREFIX = "otel_taskctx.env_exporter."
#: milliseconds between two exports of finished spans to the store
STORE_SCHEDULE_DELAY_MS = 1000
_signals_connected = False
_async_flush_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _async_flush_lock
    _async_flush_lock = threading.Lock()  # a flush thread of the parent does not exist here


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def install_span_store() -> bool:
    """Store spans in the database. Returns False when there is no SDK tracer provider."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from otel_taskctx.spans.exporter import DatabaseSpanExporter, RunningSpanProcessor

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


def _our_processors(provider: Any) -> dict[str, Any]:
    return dict(getattr(provider, _MARK, None) or {})


def provider_is_unconfigured(provider: Any) -> bool:
    """True when every span processor on ``provider`` was added by otel_taskctx."""
    active = getattr(provider, "_active_span_processor", None)
    processors = getattr(active, "_span_processors", None)
    if processors is None:
        return False
    ours = {id(p) for p in _our_processors(provider).values()}
    return all(id(p) in ours for p in processors)


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
        from opentelemetry.util._importlib_metadata import entry_points

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
        exporter = _make_exporter(name, env)
        if exporter is None:
            continue
        if name == "console":
            processor = SimpleSpanProcessor(exporter)
        else:
            processor = BatchSpanProcessor(exporter)
        marks = getattr(provider, _MARK, None) or {}
        key = ENV_PREFIX + name
        if key in marks:
            continue
        provider.add_span_processor(processor)
        marks[key] = processor
        setattr(provider, _MARK, marks)
        added.append(name)
    return added


def flush_span_store(
    timeout: float = 5.0, include_exporters: bool = True, running: bool = True
) -> bool:
    """Write this process's pending spans to the store now (and push env exporters).

    With ``running`` spans still running get their "running" row now too.
    """
    provider = sdk_tracer_provider(create=False)
    if provider is None:
        return True
    processors = _our_processors(provider)
    ok = True
    store = processors.get(STORE)
    running_processor = processors.get(RUNNING)
    try:
        if store is not None:
            ok = store.force_flush(int(timeout * 1000)) and ok
        if running_processor is not None and running:
            ok = running_processor.force_flush(int(timeout * 1000)) and ok
    except Exception:  # never into the job
        log.warning("otel_taskctx: flushing the span store failed", exc_info=True)
        ok = False
    if include_exporters:
        exporters = [p for name, p in processors.items() if name.startswith(ENV_PREFIX)]
        if exporters:
            _flush_in_background(exporters, timeout)
    return ok


def _flush_in_background(processors: list[Any], timeout: float) -> None:
    """Push remote exporters without making the job wait for the network."""
    lock = _async_flush_lock
    if not lock.acquire(blocking=False):
        return  # a flush is already on its way

    def run() -> None:
        try:
            for processor in processors:
                try:
                    processor.force_flush(int(timeout * 1000))
                except Exception:
                    log.debug("exporter flush failed", exc_info=True)
        finally:
            lock.release()

    threading.Thread(target=run, name="otel-taskctx-export-flush", daemon=True).start()


class _SoonFlusher:
    """Writes the store's pending spans soon, on a thread of its own, without making the job
    (or django-q2's monitor) wait for the database: after a quiet spell a job's spans land
    ``min_interval`` after it ends; under a steady stream of jobs the writes come at most once
    per ``busy_interval`` (the store's export schedule), so each is one batch of many jobs
    instead of a thread wake-up and a transaction every ``min_interval``. The exit flush of a
    worker process still writes whatever is left."""

    #: seconds a flush request waits for others to join it
    min_interval = 0.2
    #: seconds at least between two flushes (a request within it waits for its end)
    busy_interval = STORE_SCHEDULE_DELAY_MS / 1000

    def __init__(self, flush: Callable[[], Any] | None = None) -> None:
        self._flush = flush or (lambda: flush_span_store(running=False))
        self._wake = threading.Event()
        self._pid = 0
        self._lock = threading.Lock()

    def request(self) -> None:
        pid = current_pid()
        if self._pid != pid:
            with self._lock:
                if self._pid != pid:  # first use in this (possibly forked) process
                    self._wake = threading.Event()
                    threading.Thread(
                        target=self._run, name="otel-taskctx-span-flush", daemon=True
                    ).start()
                    self._pid = pid
        elif self._wake.is_set():
            return  # already asked for (the end signal and the span's end both ask)
        self._wake.set()

    def _run(self) -> None:
        import time

        wake = self._wake
        last = -self.busy_interval
        while True:
            wake.wait()
            # many jobs ending close together share one write (one transaction, one
            # connection): each waits at least ``min_interval`` for others to join, and
            # until ``busy_interval`` after the previous flush
            time.sleep(max(self.min_interval, last + self.busy_interval - time.monotonic()))
            wake.clear()
            last = time.monotonic()
            try:
                self._flush()
            except Exception:  # pragma: no cover - flush_span_store never raises
                log.debug("background span flush failed", exc_info=True)


_soon = _SoonFlusher()


def flush_span_store_soon() -> None:
    """Ask for the pending spans to be written now, without waiting for it."""
    _soon.request()


def _flush_after_job(sender: Any = None, **kwargs: Any) -> None:
    flush_span_store_soon()


def connect_flush_signals() -> None:
    """Flush a job's spans when it ends: in the worker and in the monitor (completion hook).

    (The instrumentation's CONSUMER span ends in its own ``post_execute_in_worker`` receiver;
    :class:`RunningSpanProcessor` flushes when that span ends, whatever the receiver order.)
    """
    global _signals_connected
    if _signals_connected:
        return
    try:
        from django_q.signals import post_execute, post_execute_in_worker
    except Exception:  # django-q2 not installed
        return
    post_execute_in_worker.connect(
        _flush_after_job, dispatch_uid="otel_taskctx.spans.flush_worker", weak=False
    )
    post_execute.connect(
        _flush_after_job, dispatch_uid="otel_taskctx.spans.flush_monitor", weak=False
    )
    _signals_connected = True
