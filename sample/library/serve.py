"""``taskctx_demo --serve``: the sample in the browser, runserver + a real qcluster.

Ctrl-C (SIGINT, sent by the terminal to the foreground process group) or SIGTERM stops both
children, each in a process group of its own, and the command exits 0 with one line saying
so. A further Ctrl-C while they stop (an impatient second press, or a launcher passing the
terminal's signal on) is ignored: the stop is bounded (runserver 10 s, qcluster 20 s, then
SIGKILL to their process groups).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from django.conf import settings
from rich.console import Console
from rich.panel import Panel

from sample.library.demo import (
    MANAGE_PY,
    ClusterProcess,
    DemoFailure,
    child_env,
    prepare_database,
    stale_cleanup,
)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _interrupt(signum: int, frame: Any) -> None:  # noqa: ARG001
    raise KeyboardInterrupt


@contextmanager
def stop_signals(handler: Any) -> Iterator[None]:
    """``handler`` for SIGINT and SIGTERM meanwhile; a SIGINT the process was started with
    ignored (a background job of a script) stays ignored."""
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in STOP_SIGNALS:
        if previous[sig] is not signal.SIG_IGN:
            signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def stop_server(server: subprocess.Popen | None) -> None:
    if server is None:
        return
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            pass
    try:  # whatever is left in its process group
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.wait(5)


class Children:
    """The two subprocesses, as far as they were started."""

    cluster: ClusterProcess | None = None
    server: subprocess.Popen | None = None

    def stop(self) -> None:
        stop_server(self.server)
        if self.cluster is not None:
            self.cluster.stop()


def serve(console: Console, options: dict[str, Any]) -> None:
    """Prepare the database, then run the cluster and runserver until Ctrl-C or SIGTERM."""
    children = Children()
    interrupted = False
    with stop_signals(_interrupt):
        try:
            _start(console, options, children)
            cluster, server = children.cluster, children.server
            while True:
                if server.poll() is not None:
                    raise DemoFailure(f"runserver exited with code {server.returncode}")
                if not cluster.alive:
                    raise DemoFailure(f"qcluster exited:\n{cluster.tail()}")
                time.sleep(0.5)
        except KeyboardInterrupt:
            interrupted = True
            console.print("stopping runserver and qcluster ...", end="")
            console.file.flush()
        finally:
            # a second Ctrl-C here must not leave either child running
            with stop_signals(signal.SIG_IGN):
                children.stop()
    if interrupted:
        console.print(" stopped")


def _start(console: Console, options: dict[str, Any], children: Children) -> None:
    from sample.library.models import Book
    from sample.library.seed import seed

    steps = prepare_database()
    console.print(f"database: {', '.join(steps)}")
    if options["reseed"] or not Book.objects.exists():
        result = seed(
            books=options["books"],
            chapters=options["chapters"],
            albums=options["albums"],
            tracks=options["tracks"],
            reset=True,
        )
        console.print(f"seeded {result.books} books and {result.albums} albums")
    stale = stale_cleanup()
    if stale:
        console.print(
            f"released the locks and progress of {stale} job(s) an earlier run left behind"
        )
    env = child_env(options["delay"], options["workers"])
    log_path = Path(settings.VAR_DIR) / "qcluster.log"
    cluster = children.cluster = ClusterProcess(env, log_path)
    cluster.start()
    cluster.wait_ready(timeout=60)
    address = f"{options['host']}:{options['port']}"
    server = children.server = subprocess.Popen(
        [sys.executable, str(MANAGE_PY), "runserver", address, "--noreload", "--insecure"],
        env=env,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    console.print(
        Panel.fit(
            f"Serving the sample at http://{address}/  (runserver pid {server.pid}, "
            f"qcluster pid {cluster.proc.pid}, log {log_path})\n"
            "Sign in with the button (user demo / password demo), open Books, tick two or more "
            "rows, Bulk Edit, set Status, Apply.\nPress Ctrl-C to stop.",
            border_style="cyan",
        )
    )
    console.file.flush()
