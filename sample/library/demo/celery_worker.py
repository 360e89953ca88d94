"""A real ``celery worker`` for the Celery demo: started in its own process group, ready when it
says so in its log, and stopped cleanly whatever happens to the demo.

The worker runs ``celery -A sample.config.celery worker`` with the prefork pool. It is stopped
with Celery's warm shutdown (SIGTERM: the running tasks finish), then anything left in its
process group is killed. The demo's ``finally`` does that on an error; :func:`stop_on_signals`
turns the first Ctrl-C, SIGTERM or SIGHUP of the demo into an exception, so that the
``finally`` runs then too, and ignores the next ones until the worker has stopped. If the demo
dies without a chance to clean up, the kernel sends the worker SIGTERM (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from sample.library.demo.cluster import MANAGE_PY
from sample.library.demo.records import DemoFailure

READY = re.compile(r"^.*?(\S+@\S+) ready\.", re.M)
RECEIVED = re.compile(r"Task (\S+)\[([0-9a-f-]+)\] received")
SUCCEEDED = re.compile(r"INFO/(ForkPoolWorker-\d+)\] Task \S+\[([0-9a-f-]+)\] succeeded")
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the demo's finally still stops it
        pass


class DemoInterrupted(Exception):
    """The demo got Ctrl-C, SIGTERM or SIGHUP (raised where it runs: its ``finally`` stops the
    worker)."""


SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    def interrupt(signum, frame):
        for sig in SIGNALS:  # once: the cleanup that follows is not interrupted
            signal.signal(sig, signal.SIG_IGN)
        raise DemoInterrupted(f"interrupted by {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, interrupt) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class CeleryWorker:
    """``celery worker`` with ``concurrency`` prefork processes, logging to ``log_path``."""

    def __init__(
        self, env: dict[str, str], log_path: Path, name: str, concurrency: int = 4
    ) -> None:
        self.env = env
        self.log_path = log_path
        self.name = name
        self.concurrency = concurrency
        self.proc: subprocess.Popen | None = None
        self.nodename = ""

    @property
    def argv(self) -> list[str]:
        from sample.config.celery import app

        return [
            sys.executable,
            *("-m", "celery", "-A", "sample.config.celery", "worker"),
            *("--pool", "prefork", "--concurrency", str(self.concurrency)),
            *("--hostname", f"{self.name}@%h", "--queues", app.conf.task_default_queue),
            *("--loglevel", "INFO", "--without-mingle", "--without-gossip"),
            "--without-heartbeat",
        ]

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=MANAGE_PY.parent.parent,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_ready(self, timeout: float) -> float:
        """Wait until the worker logs ``<nodename> ready.`` (its pool processes are up)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            self.check_alive()
            match = READY.search(self.log_text())
            if match:
                self.nodename = match.group(1)
                return time.monotonic() - start
            time.sleep(0.1)
        raise DemoFailure(f"celery worker not ready within {timeout:.0f}s:\n{self.tail()}")

    def check_alive(self) -> None:
        if not self.alive:
            code = self.proc.returncode if self.proc else "?"
            raise DemoFailure(f"celery worker exited with code {code}:\n{self.tail()}")

    def log_size(self) -> int:
        return len(self.log_text())

    def received(self, names: set[str], since: int = 0) -> set[str]:
        """Ids of the tasks of these names that the worker received (its log says so), since
        the log had ``since`` characters."""
        found = RECEIVED.findall(self.log_text()[since:])
        return {task_id for name, task_id in found if name in names}

    def ran_by(self, task_ids: set[str], since: int = 0) -> set[str]:
        """The pool processes (``ForkPoolWorker-N``) that ran these tasks, from the log."""
        found = SUCCEEDED.findall(self.log_text()[since:])
        return {process for process, task_id in found if task_id in task_ids}

    def pool_pids(self) -> list[int]:
        """The worker's pool processes (children of its main process)."""
        if self.proc is None:
            return []
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return [int(p) for p in path.read_text().split()]
        except (FileNotFoundError, ProcessLookupError, ValueError):
            return []

    def stop(self, timeout: float = 30.0) -> int | None:
        """Warm shutdown (running tasks finish), then whatever is left of its process group;
        a Ctrl-C, SIGTERM or SIGHUP meanwhile is ignored (the stop is bounded)."""
        if self.proc is None:
            return None
        with _signals_ignored():
            return self._stop(timeout)

    def _stop(self, timeout: float) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # a pool process that did not stop
        self.proc.wait(5)
        return self.proc.returncode
