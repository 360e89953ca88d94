"""A span row names the process that made it, also after a fork (django-q2 forks its workers
from the cluster)."""

import multiprocessing
import os

import pytest
from opentelemetry.sdk.trace import TracerProvider

from otel_taskctx.spans.rows import span_row


def _process() -> str:
    span = TracerProvider().get_tracer("t").start_span("s")
    span.end()
    return span_row(span, 256)["process"]


def _report(conn) -> None:
    conn.send((_process(), os.getpid()))
    conn.close()


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded")
def test_a_row_names_the_childs_pid_after_os_fork():
    assert _process().endswith(f":{os.getpid()}")
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.write(write, _process().encode())
        os._exit(0)
    os.close(write)
    seen = os.read(read, 300).decode()
    os.close(read)
    os.waitpid(child, 0)
    assert seen.endswith(f":{child}")
    assert _process().endswith(f":{os.getpid()}")


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded")
def test_a_row_names_the_childs_pid_in_a_multiprocessing_fork_child():
    ctx = multiprocessing.get_context("fork")
    parent_end, child_end = ctx.Pipe()
    process = ctx.Process(target=_report, args=(child_end,))
    process.start()
    seen, real = parent_end.recv()
    process.join(10)
    assert real == process.pid and seen.endswith(f":{real}")
