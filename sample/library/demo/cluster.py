"""The demo's surroundings: its database, the qcluster subprocess and leftovers of earlier runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.core.management import call_command
from django.db import connections
from django.db.utils import OperationalError

from sample.library.demo.records import DemoFailure

MANAGE_PY = Path(__file__).resolve().parents[2] / "manage.py"


def ensure_database(alias: str = "default") -> bool:
    """Create the PostgreSQL database named in the settings if it does not exist yet."""
    connection = connections[alias]
    if connection.vendor != "postgresql":
        return False
    try:
        connection.ensure_connection()
        return False
    except OperationalError as exc:
        if "does not exist" not in str(exc):
            raise
    name = connection.settings_dict["NAME"]
    with connection._nodb_cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {connection.ops.quote_name(name)}")
    connection.close()
    return True


def prepare_database() -> list[str]:
    """Migrate both databases and create the cache table; idempotent."""
    done = []
    if ensure_database():
        done.append(f"created database {connections['default'].settings_dict['NAME']}")
    call_command("migrate", interactive=False, verbosity=0)
    done.append("migrated")
    runtime = getattr(settings, "RUNTIME_DB", None)
    if runtime and runtime in settings.DATABASES:
        if getattr(settings, "RUNTIME_DB_SEPARATE", False):
            call_command("migrate", database=runtime, interactive=False, verbosity=0)
            done.append(f"migrated the {runtime!r} database")
        if any("DatabaseCache" in c["BACKEND"] for c in settings.CACHES.values()):
            call_command("createcachetable", database=runtime, verbosity=0)
            done.append("created the cache table")
    return done


class ClusterProcess:
    """A ``manage.py qcluster`` subprocess in its own process group, logging to a file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, str(MANAGE_PY), "qcluster"],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, timeout: float) -> float:
        """Wait until the cluster runs a probe task (powercrud's own health check)."""
        from powercrud.async_manager import AsyncManager

        manager = AsyncManager()
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if not self.alive:
                raise DemoFailure(
                    f"qcluster exited with code {self.proc.returncode if self.proc else '?'}:\n"
                    f"{self.tail()}"
                )
            if manager.validate_async_qcluster(timeout_ms=2000):
                return time.monotonic() - start
            time.sleep(0.2)
        raise DemoFailure(f"qcluster did not answer within {timeout:.0f}s:\n{self.tail()}")

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            # the cluster's own process stops its workers, monitor and pusher in order (a
            # signal to the whole group leaves it waiting for children that died under it)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left in its process group (a worker that did not stop)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(5)
        return self.proc.returncode


def child_env(delay: float | None = None, workers: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["DJANGO_SETTINGS_MODULE"] = os.environ.get(
        "DJANGO_SETTINGS_MODULE", "sample.config.settings"
    )
    if delay is not None:
        env["SAMPLE_SAVE_DELAY"] = str(delay)
    if workers is not None:
        env["SAMPLE_WORKERS"] = str(workers)
    root = str(MANAGE_PY.parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def stale_cleanup() -> int:
    """powercrud's own cleanup (``pcrud_cleanup_async``) of jobs that never completed.

    A run interrupted mid-job leaves that job's locks (an hour's TTL) and progress behind; on a
    recreated database the ids come back and the new job would be refused. The demo owns the
    sample's data, so every active job that did not finish is stale here.
    """
    from sample.library.async_manager import SampleAsyncManager

    summary = SampleAsyncManager().cleanup_completed_tasks()
    return sum(
        1
        for entry in summary.get("cleaned", {}).values()
        if entry.get("reason") != "completed successfully"
    )
