"""Ctrl-C on ``taskctx_demo --serve`` (``make serve``): both children stop, one line, exit 0.

The command runs as in a terminal: in a process group of its own with SIGINT at its default,
and the signal goes to the whole group, as the terminal sends it. A second Ctrl-C while the
children stop (an impatient user) must not break the stop either.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_demo import REPO_ROOT, sample_env
from tests.test_sample_browser import free_port, wait_for_http

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(
        os.environ.get("TASKCTX_STACK", "embedded") != "embedded",
        reason="runs on the embedded stack",
    ),
]
PIDS = re.compile(r"runserver pid (\d+), qcluster pid (\d+)")
STOP_LINE = "stopping runserver and qcluster ... stopped"


def live_in_group(pgid: int) -> list[int]:
    """Processes of process group ``pgid`` that are not zombies (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            found.append(int(entry.name))
    return found


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def as_in_a_terminal() -> None:
    # a terminal's foreground job starts with SIGINT at its default (this test may run in a
    # background job of a shell, where it is ignored and children would inherit that)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("presses", [1, 2], ids=["ctrl-c", "ctrl-c-twice"])
def test_ctrl_c_stops_runserver_and_qcluster_cleanly(tmp_path, presses):
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable, "sample/manage.py", "taskctx_demo", "--serve",
                "--port", str(port), "--books", "2", "--chapters", "1",
                "--albums", "0", "--tracks", "0",
            ],
            cwd=REPO_ROOT, env=sample_env(tmp_path), stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, process_group=0, preexec_fn=as_in_a_terminal,
        )  # fmt: skip
    groups: list[int] = []
    try:
        wait_for_http(f"http://127.0.0.1:{port}/accounts/login/", proc, log)
        match = PIDS.search(log.read_text())
        assert match, log.read_text()
        groups = [int(match[1]), int(match[2])]  # each child leads a process group
        assert all(live_in_group(g) for g in groups)
        assert len(live_in_group(groups[1])) > 1  # the cluster's workers, monitor, pusher

        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole group
        if presses == 2:
            assert wait_until(lambda: "stopping" in log.read_text(), 30), log.read_text()
            assert proc.poll() is None and live_in_group(groups[1])  # still stopping
            os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(60)
        # runserver and the whole cluster are gone (looked at before the clean-up below)
        for group in groups:
            wait_until(lambda g=group: not live_in_group(g), 5)
        left = {group: live_in_group(group) for group in groups}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        for group in groups:
            if live_in_group(group):
                os.killpg(group, signal.SIGKILL)
    text = log.read_text(errors="replace")
    assert code == 0, text[-3000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    assert text.count("stopping") == 1
    assert [line for line in text.splitlines() if line.strip()][-1] == STOP_LINE
    assert left == {group: [] for group in groups}
