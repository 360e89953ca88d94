"""The Celery benchmarks' worker: a real ``celery worker`` subprocess (prefork) on
:mod:`tests.benchmarks.celery_bench_app`, its CPU read from ``/proc``, and the environment a
variant's producer and worker share."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
APP = "tests.benchmarks.celery_bench_app"
INSTANCE = os.environ.get("TASKCTX_INSTANCE", "main")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def broker_url(kind: str, folder: Path) -> str:
    """``filesystem`` (kombu's filesystem transport in ``folder``: no server) or ``redis``
    (Redis DB ``TASKCTX_REDIS_DB`` + 1, as the test stack's broker)."""
    if kind == "filesystem":
        folder.mkdir(parents=True, exist_ok=True)
        return f"filesystem:{folder}"
    if kind == "redis":
        url = os.environ.get("TASKCTX_REDIS_URL", "redis://127.0.0.1:6379")
        return f"{url}/{int(os.environ.get('TASKCTX_REDIS_DB', '1')) + 1}"
    raise ValueError(f"unknown broker {kind!r} (filesystem or redis)")


def variant_env(db: str, broker: str, otel_celery: bool, otel_taskctx: dict) -> dict[str, str]:
    """One variant's environment, for its producer and its worker alike."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "BENCH_"))}
    env.update(
        DJANGO_SETTINGS_MODULE="tests.settings",
        TASKCTX_STACK="embedded",
        TASKCTX_DB_NAME=db,
        TASKCTX_TEST_OTEL_TASKCTX=json.dumps(otel_taskctx),
        BENCH_CELERY_BROKER=broker,
        BENCH_CELERY_QUEUE=f"taskctx-bench-{INSTANCE}-{uuid.uuid4().hex[:6]}",
        BENCH_OTEL_CELERY="1" if otel_celery else "0",
        PYTHONPATH=str(REPO_ROOT),
        PYTHONUNBUFFERED="1",
    )
    return env


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds) of a live process, from ``/proc/<pid>/stat``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def tree_cpu(root: int) -> float:
    """CPU seconds (user + system) of ``root`` and its live descendants."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            stats[int(entry.name)] = stat
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _) in stats.items():
            if ppid == parent and pid not in tree:
                tree.add(pid)
                frontier.append(pid)
    return sum(stats[pid][1] for pid in tree if pid in stats)


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.01)


class Worker:
    def __init__(self, proc: subprocess.Popen, log: Path) -> None:
        self.proc, self.log = proc, log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        return tree_cpu(self.proc.pid)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def run_worker(
    env: dict[str, str], concurrency: int, marker: Callable[[str], None]
) -> Iterator[Worker]:
    """A ``celery worker`` (prefork, ``concurrency`` processes) on the variant's queue, ready
    when a ``bench.mark`` task sent through ``marker(path)`` has run; stopped (SIGTERM, then
    SIGKILL of its group) on exit."""
    run_dir = Path(tempfile.mkdtemp(prefix="bench-celery-worker-"))
    log = run_dir / "worker.log"
    argv = [sys.executable, "-m", "celery", "-A", APP, "worker", "--pool=prefork"]
    argv += [f"--concurrency={concurrency}", f"--queues={env['BENCH_CELERY_QUEUE']}"]
    argv += [f"--hostname=bench-{env['BENCH_CELERY_QUEUE']}@%h", "--loglevel=WARNING"]
    argv += ["--without-mingle", "--without-gossip", "--without-heartbeat"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    worker = Worker(proc, log)
    try:
        ready = run_dir / "ready.json"
        marker(str(ready))
        wait_for(lambda: ready.exists() or proc.poll() is not None, 120, "the worker")
        if not ready.exists():
            raise RuntimeError(f"the worker exited ({proc.returncode}):\n{worker.tail()}")
        yield worker
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
