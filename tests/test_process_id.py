"""The cached process id follows fork (django-q2 forks its workers from the cluster)."""

import multiprocessing
import os

import pytest

from otel_taskctx.spans.rows import current_pid


def _report(conn) -> None:
    conn.send((current_pid(), os.getpid()))
    conn.close()


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded")
def test_current_pid_is_the_childs_after_os_fork():
    assert current_pid() == os.getpid()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.write(write, f"{current_pid()} {os.getpid()}".encode())
        os._exit(0)
    os.close(write)
    seen, real = os.read(read, 100).decode().split()
    os.close(read)
    os.waitpid(child, 0)
    assert seen == real == str(child)
    assert current_pid() == os.getpid() != child


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded")
def test_current_pid_is_the_childs_in_a_multiprocessing_fork_child():
    ctx = multiprocessing.get_context("fork")
    parent_end, child_end = ctx.Pipe()
    process = ctx.Process(target=_report, args=(child_end,))
    process.start()
    seen, real = parent_end.recv()
    process.join(10)
    assert seen == real == process.pid
