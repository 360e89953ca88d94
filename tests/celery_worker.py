"""A real Celery worker for tests: a ``celery worker`` subprocess (prefork) on the test database.

API
---
``run_worker(**options)``
    Context manager: starts ``python -m tests.celery_worker`` (Celery's own ``worker``
    command on :mod:`tests.celery_app`, after the settings overrides and tracing of
    tests/cluster.py's launcher) pointed at the pytest test database, waits until it says
    it is ready, yields a :class:`Worker` and stops it (SIGTERM, then SIGKILL of its group).

    Options: ``concurrency`` (prefork processes, default 2), ``settings`` (dicts merged, e.g.
    ``{"OTEL_TASKCTX": {...}}`` or ``{"CELERY_RESULT_BACKEND": result_backend(tmp)}``),
    ``env``, ``span_dir`` (spans as JSON lines, one file per process), ``args``.

``celery_worker`` fixture
    ``start(**options) -> Worker``; every worker stops after the test (``transactional_db``).

The queue, the worker's node name and the broker's exchanges carry ``TASKCTX_INSTANCE``.
Mark tests ``@pytest.mark.celery`` (and ``stack`` to rerun them on Redis + PostgreSQL).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import (
    REPO_ROOT,
    SETTINGS_ENV,
    SPAN_DIR_ENV,
    SPAN_PROCESSOR_ENV,
    Cluster,
    _setup_tracing,
    _test_database_name,
)

INSTANCE = os.environ.get("TASKCTX_INSTANCE", "main")


def result_backend(directory: Path | str) -> str:
    """A result backend with no server: Celery's filesystem backend in ``directory``."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    return f"file://{Path(directory).resolve()}"


class Worker(Cluster):
    """A running ``celery worker`` subprocess (``wait_for``, ``spans``, ``tail`` as for a
    qcluster)."""

    def pool_pids(self) -> list[int]:
        """Pids of the pool processes (children of the worker's main process)."""
        try:
            out = subprocess.run(
                ["pgrep", "-P", str(self.pid)], capture_output=True, text=True, check=False
            ).stdout
        except FileNotFoundError:  # no pgrep: /proc
            out = "\n".join(
                p.name for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(p) == self.pid
            )
        return sorted(int(pid) for pid in out.split())

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM (Celery's warm shutdown: running tasks end first), SIGQUIT (cold) if a task
        still runs after ``timeout``; SIGKILL the process group if that hangs too (a warning:
        the tests assert what the worker did, not how fast it stops)."""
        for sig in (signal.SIGTERM, signal.SIGQUIT):
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    continue
        if self.proc.poll() is None:  # (seen after a terminating revoke on a loaded host)
            warnings.warn(f"the Celery worker did not stop; killed:\n{self.tail(10)}", stacklevel=2)
        self._kill_group()
        self.proc.wait(10)
        return self.proc.returncode


def _ppid(proc_dir: Path) -> int:
    try:
        stat = (proc_dir / "stat").read_text()
    except OSError:
        return -1
    return int(stat.rsplit(")", 1)[1].split()[1])


def purge() -> None:
    """Drop messages a previous (crashed) run left in the test queue."""
    from tests.celery_app import app

    try:
        with app.connection_for_write() as conn:
            conn.default_channel.queue_purge(app.conf.task_default_queue)
    except Exception:  # no such queue yet
        pass


@contextmanager
def run_worker(
    *,
    concurrency: int = 2,
    settings: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    span_dir: Path | str | None = None,
    args: tuple[str, ...] = (),
    startup_timeout: float = 60.0,
) -> Iterator[Worker]:
    from django.conf import settings as django_settings

    run_dir = Path(tempfile.mkdtemp(prefix="celery-worker-"))
    log_path = run_dir / "worker.log"
    child_env = dict(os.environ)
    child_env.update(
        {
            "DJANGO_SETTINGS_MODULE": django_settings.SETTINGS_MODULE or "tests.settings",
            "TASKCTX_DB_NAME": _test_database_name(),
            SETTINGS_ENV: json.dumps(settings or {}),
            SPAN_PROCESSOR_ENV: "simple",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
            ),
        }
    )
    child_env.pop(SPAN_DIR_ENV, None)
    if span_dir is not None:
        Path(span_dir).mkdir(parents=True, exist_ok=True)
        child_env[SPAN_DIR_ENV] = str(span_dir)
    child_env.update(env or {})
    node = f"taskctx-{INSTANCE}-{uuid.uuid4().hex[:8]}@%h"
    argv = [
        sys.executable,
        "-m",
        "tests.celery_worker",
        "worker",
        "--pool=prefork",
        f"--concurrency={concurrency}",
        f"--queues={django_settings.CELERY_QUEUE}",
        f"--hostname={node}",
        "--without-mingle",
        "--without-gossip",
        "--without-heartbeat",
        "--loglevel=INFO",
        *args,
    ]
    purge()
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            env=child_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    worker = Worker(proc, log_path, concurrency, Path(span_dir) if span_dir else None)
    try:
        worker.wait_for(
            lambda: (
                re.search(r"\bready\.", worker.log_text())
                and len(worker.pool_pids()) >= concurrency
            ),
            timeout=startup_timeout,
            what="the Celery worker to start",
        )
        yield worker
    finally:
        worker.stop()


@pytest.fixture
def celery_worker(transactional_db, tmp_path):
    """``start(**run_worker options) -> Worker``; every worker stops after the test."""
    stack: list[Any] = []

    def start(**options: Any) -> Worker:
        options.setdefault("span_dir", tmp_path / f"celery-spans-{len(stack)}")
        manager = run_worker(**options)
        worker = manager.__enter__()
        stack.append(manager)
        return worker

    yield start
    while stack:
        stack.pop().__exit__(None, None, None)


# --------------------------------------------------------------------------- launcher


def main(argv: list[str]) -> None:
    """``python -m tests.celery_worker worker ...``: settings overrides + tracing, then
    Celery's command line on the test app."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    from django.conf import settings

    for name, value in json.loads(os.environ.get(SETTINGS_ENV) or "{}").items():
        current = getattr(settings, name, None)
        if isinstance(current, dict) and isinstance(value, dict):
            value = {**current, **value}
        setattr(settings, name, value)
    _setup_tracing()
    import django

    # opentelemetry-instrumentation-celery instrumented before or after otel_taskctx
    otel = os.environ.get("TASKCTX_CELERY_OTEL", "")
    if otel == "before":
        from opentelemetry.instrumentation.celery import CeleryInstrumentor

        CeleryInstrumentor().instrument()
    django.setup()
    if otel == "after":
        from opentelemetry.instrumentation.celery import CeleryInstrumentor

        CeleryInstrumentor().instrument()
    from tests.celery_app import app

    app.worker_main(argv or ["worker"])


if __name__ == "__main__":
    main(sys.argv[1:])
