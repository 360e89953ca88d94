"""A real django-q2 cluster for tests: a ``qcluster`` subprocess on the test database.

API
---
``run_cluster(**options)``
    Context manager: starts ``python -m tests.cluster qcluster`` (Django's own ``qcluster``
    management command, after the small launcher below) pointed at the pytest test database
    (``TASKCTX_DB_NAME``) with this process's ``TASKCTX_*`` environment, waits until the
    sentinel and every worker are ready, yields a :class:`Cluster`, and stops it cleanly
    (SIGTERM, then SIGKILL of its process group if it hangs).

    Options: ``q_cluster`` (dict merged into ``Q_CLUSTER``, e.g. ``{"workers": 1,
    "recycle": 1}``), ``settings`` (other settings; dicts are merged, e.g.
    ``{"OTEL_TASKCTX": {...}}``), ``env`` (extra environment), ``span_dir`` (export every
    span as JSON lines there: see :meth:`Cluster.spans`), ``span_processor`` (``"batch"``,
    the SDK's BatchSpanProcessor, or ``"simple"``), ``startup_timeout``.

``qcluster`` fixture
    A default cluster for one test (``transactional_db``, so the subprocess sees committed
    rows), exporting spans to a temporary directory. ``cluster_factory`` starts clusters with
    options and stops them after the test.

Use ``@pytest.mark.django_db(transaction=True)`` (or the fixtures above) in tests that talk
to a cluster; mark them ``@pytest.mark.cluster`` (and ``stack`` to run them on Redis +
PostgreSQL too).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
#: JSON object of settings the launcher applies before Django starts.
SETTINGS_ENV = "TASKCTX_CLUSTER_SETTINGS"
#: Directory where the launcher's exporter writes ``spans-<pid>.jsonl`` files.
SPAN_DIR_ENV = "TASKCTX_SPAN_DIR"
#: "batch" (default) or "simple".
SPAN_PROCESSOR_ENV = "TASKCTX_SPAN_PROCESSOR"


class ClusterError(RuntimeError):
    pass


class Cluster:
    """A running qcluster subprocess."""

    def __init__(
        self, proc: subprocess.Popen, log_path: Path, workers: int, span_dir: Path | None
    ) -> None:
        self.proc = proc
        self.log_path = log_path
        self.workers = workers
        self.span_dir = span_dir

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def worker_pids(self) -> list[int]:
        """Pids of the workers that announced themselves (recycled ones included)."""
        pids = []
        for line in self.log_text().splitlines():
            if "ready for work at" in line:
                try:
                    pids.append(int(line.rsplit("ready for work at", 1)[1].strip()))
                except ValueError:
                    continue
        return pids

    def wait_for(
        self,
        predicate: Callable[[], Any],
        timeout: float = 20.0,
        interval: float = 0.05,
        what: str = "condition",
    ) -> Any:
        """Poll ``predicate`` until it returns something truthy; fail with the cluster log."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if not self.alive:
                raise ClusterError(f"qcluster exited while waiting for {what}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out after {timeout}s waiting for {what}:\n{self.tail()}")
            time.sleep(interval)

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def spans(self) -> list[dict[str, Any]]:
        """Every span exported so far, as dicts (``span.to_json()`` of the SDK)."""
        if self.span_dir is None:
            raise ClusterError("this cluster was started without span_dir")
        found = []
        for path in sorted(self.span_dir.glob("spans-*.jsonl")):
            for line in path.read_text().splitlines():
                if line.strip():
                    try:
                        found.append(json.loads(line))
                    except ValueError:  # a line being written right now
                        continue
        return found

    def wait_for_spans(
        self, predicate: Callable[[list[dict[str, Any]]], Any], timeout: float = 20.0
    ) -> list[dict[str, Any]]:
        self.wait_for(lambda: predicate(self.spans()), timeout=timeout, what="exported spans")
        return self.spans()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (django-q2's clean shutdown); SIGKILL the process group if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill_group()
                self.proc.wait(10)
                raise ClusterError(f"qcluster did not stop in {timeout}s:\n{self.tail()}") from None
        self._kill_group()  # stray children, if any
        return self.proc.returncode

    def _kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _test_database_name(alias: str = "default") -> str:
    from django.db import connections

    return str(connections[alias].settings_dict["NAME"])


def _purge_broker() -> None:
    """Drop packages a previous (crashed) run left in the broker's queue."""
    from django_q.brokers import get_broker

    try:
        get_broker().purge_queue()
    except Exception:  # an empty ORM queue table, a broker that cannot purge: fine
        pass


@contextmanager
def run_cluster(
    *,
    q_cluster: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    span_dir: Path | str | None = None,
    span_processor: str = "batch",
    startup_timeout: float = 60.0,
    db_alias: str = "default",
) -> Iterator[Cluster]:
    from django.conf import settings as django_settings

    overrides: dict[str, Any] = dict(settings or {})
    if q_cluster:
        overrides["Q_CLUSTER"] = {**overrides.get("Q_CLUSTER", {}), **q_cluster}
    workers = int({**django_settings.Q_CLUSTER, **overrides.get("Q_CLUSTER", {})}.get("workers", 1))
    run_dir = Path(tempfile.mkdtemp(prefix="qcluster-"))
    log_path = run_dir / "qcluster.log"
    child_env = dict(os.environ)
    child_env.update(
        {
            # settings.SETTINGS_MODULE is None under pytest-django's live_server: fall back
            "DJANGO_SETTINGS_MODULE": django_settings.SETTINGS_MODULE
            or os.environ.get("DJANGO_SETTINGS_MODULE", "tests.settings"),
            "TASKCTX_DB_NAME": _test_database_name(db_alias),
            SETTINGS_ENV: json.dumps(overrides),
            SPAN_PROCESSOR_ENV: span_processor,
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
            ),
        }
    )
    child_env.pop(SPAN_DIR_ENV, None)
    child_env.setdefault("OTEL_BSP_SCHEDULE_DELAY", "100")  # tests wait for exports
    if span_dir is not None:
        span_dir = Path(span_dir)
        span_dir.mkdir(parents=True, exist_ok=True)
        child_env[SPAN_DIR_ENV] = str(span_dir)
    child_env.update(env or {})
    _purge_broker()
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.cluster", "qcluster"],
            cwd=REPO_ROOT,
            env=child_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    cluster = Cluster(proc, log_path, workers, span_dir)
    try:
        cluster.wait_for(
            lambda: "running." in cluster.log_text() and len(cluster.worker_pids()) >= workers,
            timeout=startup_timeout,
            what="the cluster to start",
        )
        yield cluster
    finally:
        cluster.stop()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def cluster_factory(transactional_db, tmp_path):
    """``start(**run_cluster options) -> Cluster``; every cluster stops after the test."""
    stack: list[Any] = []

    def start(**options: Any) -> Cluster:
        options.setdefault("span_dir", tmp_path / f"spans-{len(stack)}")
        manager = run_cluster(**options)
        cluster = manager.__enter__()
        stack.append(manager)
        return cluster

    yield start
    while stack:
        stack.pop().__exit__(None, None, None)


@pytest.fixture
def qcluster(cluster_factory):
    """A running cluster with the test settings (two workers), spans exported to a tmp dir."""
    return cluster_factory()


# --------------------------------------------------------------------------- launcher


class _JsonLinesSpanExporter:
    """Appends each finished span as one JSON line to ``<dir>/spans-<pid>.jsonl``."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        lines = "".join(span.to_json(indent=None) + "\n" for span in spans)
        with open(self.directory / f"spans-{os.getpid()}.jsonl", "a") as out:
            out.write(lines)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _setup_tracing() -> None:
    """The cluster's host sets up its tracer provider (as the test suite does), exporting to
    ``TASKCTX_SPAN_DIR`` if set; ``TASKCTX_NO_PROVIDER=1``: none (otel_taskctx's own)."""
    if os.environ.get("TASKCTX_NO_PROVIDER") == "1":
        return
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider()
    directory = os.environ.get(SPAN_DIR_ENV)
    if directory:
        exporter = _JsonLinesSpanExporter(directory)
        if os.environ.get(SPAN_PROCESSOR_ENV, "batch") == "simple":
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        else:
            provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)


def main(argv: list[str]) -> None:
    """``python -m tests.cluster qcluster``: settings overrides + tracing, then Django."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    from django.conf import settings

    for name, value in json.loads(os.environ.get(SETTINGS_ENV) or "{}").items():
        current = getattr(settings, name, None)
        if isinstance(current, dict) and isinstance(value, dict):
            value = {**current, **value}
        setattr(settings, name, value)
    _setup_tracing()
    from django.core.management import execute_from_command_line

    execute_from_command_line(["django", *(argv or ["qcluster"])])


if __name__ == "__main__":
    main(sys.argv[1:])
