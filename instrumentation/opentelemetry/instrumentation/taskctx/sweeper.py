"""Lost fan-out children fail their job: :func:`sweep`, run by a lazy daemon thread per
process while any child is pending (see docs/fan_out.md).
"""

from __future__ import annotations

import logging
import os
import threading

from opentelemetry.instrumentation.taskctx import barrier, tasks_carriers

from otel_taskctx.conf import get_setting

log = logging.getLogger("otel_taskctx.instrumentation")


def sweep(force: bool = True) -> int:
    """Fail children with no result after ``FAN_OUT_TIMEOUT`` seconds and complete their jobs;
    the number failed. (``force`` is accepted for callers of earlier versions.)"""
    timeout = float(get_setting("FAN_OUT_TIMEOUT") or 0)
    if timeout <= 0:
        return 0
    stale = barrier.store().stale(timeout)
    results = tasks_carriers.results_of_children([name for _, name in stale])
    failed = 0
    for _, name in stale:
        lost = (
            "the db_worker that ran it was killed or lost (django-tasks-db never runs a task "
            "twice), or no db_worker took it in time"
            if name in results
            else "its worker was killed or lost, and the broker did not deliver it again"
        )
        error = f"no result within FAN_OUT_TIMEOUT ({timeout:g} s): {lost}"
        if name in results:
            tasks_carriers.fail_lost(results[name], error)
        failed += barrier.child_ended(name, error, "lost") is not None
    return failed


_lock = threading.Lock()
_thread: tuple[int, threading.Thread] | None = None
#: set to stop the thread early (tests)
stopping = threading.Event()


def running() -> bool:
    return _thread is not None and _thread[0] == os.getpid() and _thread[1].is_alive()


def ensure_running() -> None:
    """Start this process's sweeper thread if it is not running (and a timeout is set)."""
    global _thread
    try:
        if running() or float(get_setting("FAN_OUT_TIMEOUT") or 0) <= 0:
            return
    except Exception:  # settings not configured
        return
    with _lock:
        if running():
            return
        from otel_taskctx.context import start_detached

        stopping.clear()
        interval = float(get_setting("FAN_OUT_SWEEP_INTERVAL") or 10)
        thread = threading.Thread(target=_run, args=(interval,), daemon=True)
        thread.name = "otel_taskctx-fan-out-sweeper"
        _thread = (os.getpid(), thread)
        start_detached(thread)  # outside the job that happened to start it


def _run(interval: float) -> None:
    global _thread
    from django.db import connections

    pending = True
    try:
        while pending and not stopping.wait(interval):
            try:
                if failed := sweep():
                    log.warning("fan-out sweep: %d lost children failed their jobs", failed)
                pending = barrier.store().any_pending()
            except Exception:
                log.warning("could not sweep fan-out jobs", exc_info=True)
        with _lock:
            if _thread is not None and _thread[1] is threading.current_thread():
                _thread = None
        if not stopping.is_set() and barrier.store().any_pending():  # added after the last look
            ensure_running()
    except Exception:
        log.debug("could not look for pending fan-out children", exc_info=True)
    finally:
        connections.close_all()  # this thread's own connections
