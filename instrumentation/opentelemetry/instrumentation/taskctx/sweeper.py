"""Lost fan-out children fail their job by themselves, with no cron and no other traffic.

A fanned-out child whose worker was killed never reports its end, and neither the Redis
broker nor django-tasks-db runs it again. :func:`._barrier.sweep` fails children with no
result after ``OTEL_TASKCTX["FAN_OUT_TIMEOUT"]`` seconds and completes their jobs; this module
runs it every ``FAN_OUT_SWEEP_INTERVAL`` seconds on one daemon thread in each process that
launched, ran or waits for fan-out work, for as long as any child is pending anywhere. So a
lost child fails its job within ``FAN_OUT_TIMEOUT`` plus the interval while any such process
lives (a long-running worker; ``db_worker --batch`` exits when the queue is empty).

The thread starts lazily (:func:`ensure_running`): a process that never meets fan-out has no
thread and makes no query for it. ``manage.py taskctx_sweep`` stays for deployments that want
a cron entry too.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger("otel_taskctx.instrumentation")

_lock = threading.Lock()
_thread: threading.Thread | None = None
_pid = 0
#: set to stop the thread early (tests)
_stop = threading.Event()


def _settings() -> tuple[float, float]:
    """``(FAN_OUT_TIMEOUT, FAN_OUT_SWEEP_INTERVAL)``."""
    from otel_taskctx.conf import get_setting

    return float(get_setting("FAN_OUT_TIMEOUT") or 0), float(
        get_setting("FAN_OUT_SWEEP_INTERVAL") or 10
    )


def running() -> bool:
    thread = _thread
    return thread is not None and _pid == os.getpid() and thread.is_alive()


def ensure_running() -> None:
    """Start this process's sweeper thread if it is not running (and a timeout is set)."""
    global _thread, _pid
    if running():
        return
    try:
        timeout, interval = _settings()
    except Exception:  # settings not configured
        return
    if timeout <= 0:
        return
    with _lock:
        if running():
            return
        _stop.clear()
        _pid = os.getpid()
        from otel_taskctx.context import start_detached

        _thread = threading.Thread(
            target=_run, args=(interval,), name="otel_taskctx-fan-out-sweeper", daemon=True
        )
        start_detached(_thread)  # outside the job that happened to start it


def stop(timeout: float = 10.0) -> None:
    """Stop the sweeper thread of this process (tests)."""
    thread = _thread
    _stop.set()
    if thread is not None and thread is not threading.current_thread():
        thread.join(timeout)


def _run(interval: float) -> None:
    global _thread
    from django.db import connections
    from opentelemetry.instrumentation.taskctx import _barrier

    pending = True
    try:
        while pending and not _stop.wait(interval):
            try:
                failed = _barrier.sweep()
                if failed:
                    log.warning("fan-out sweep: %d lost children failed their jobs", failed)
                pending = _barrier.any_pending()
            except Exception:
                log.warning("could not sweep fan-out jobs", exc_info=True)
    finally:
        connections.close_all()  # this thread's own connections
        with _lock:
            if _thread is threading.current_thread():
                _thread = None
    # a child added after the last look, while this thread was still seen running
    if not _stop.is_set():
        try:
            if _barrier.any_pending():
                ensure_running()
        except Exception:
            log.debug("could not look for pending fan-out children", exc_info=True)
        finally:
            connections.close_all()
