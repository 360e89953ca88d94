"""Having the store's pending spans written now, or soon, and pushing the env exporters.

:func:`flush_span_store` writes this process's pending spans and waits for it (management
commands, tests, a worker that exits). :func:`flush_span_store_soon` asks for the write
without waiting: a job's end does, so its spans land about a second at most after it ran.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from otel_taskctx.context import start_detached
from otel_taskctx.tracer_provider import registered_processors

log = logging.getLogger("otel_taskctx.spans")

#: the names under which the store's processors are added to the provider
STORE = "otel_taskctx.span_store"
RUNNING = "otel_taskctx.span_store.running"
#: the names of the exporters added for ``OTEL_TRACES_EXPORTER`` start with this
ENV_PREFIX = "otel_taskctx.env_exporter."
#: milliseconds between two writes of finished spans to the store (the writer's
#: ``FINISHED_INTERVAL``): the soon-flusher's pace under a steady stream of jobs
STORE_SCHEDULE_DELAY_MS = 1000
_signals_connected = False
_async_flush_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _async_flush_lock
    _async_flush_lock = threading.Lock()  # a flush thread of the parent does not exist here


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def flush_span_store(
    timeout: float = 5.0, include_exporters: bool = True, running: bool = True
) -> bool:
    """Write this process's pending spans to the store now (and push env exporters).

    With ``running`` spans still running get their "running" row now too.
    """
    processors = registered_processors()
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

    start_detached(threading.Thread(target=run, name="otel-taskctx-export-flush", daemon=True))


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
        pid = os.getpid()  # (a request comes once or twice per job: no need to cache it)
        if self._pid != pid:
            with self._lock:
                if self._pid != pid:  # first use in this (possibly forked) process
                    self._wake = threading.Event()
                    start_detached(
                        threading.Thread(
                            target=self._run, name="otel-taskctx-span-flush", daemon=True
                        )
                    )
                    self._pid = pid
        elif self._wake.is_set():
            return  # already asked for (the end signal and the span's end both ask)
        self._wake.set()

    def _run(self) -> None:
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
    :class:`~otel_taskctx.spans.exporter.RunningSpanProcessor` flushes when that span ends,
    whatever the receiver order.)
    """
    global _signals_connected
    if _signals_connected:
        return
    from otel_taskctx import hosts

    if not hosts.django_q():  # django-q2 not in use (importing it warns without Q_CLUSTER)
        return
    from django_q.signals import post_execute, post_execute_in_worker

    post_execute_in_worker.connect(
        _flush_after_job, dispatch_uid="otel_taskctx.spans.flush_worker", weak=False
    )
    post_execute.connect(
        _flush_after_job, dispatch_uid="otel_taskctx.spans.flush_monitor", weak=False
    )
    _signals_connected = True
