"""This process's id, without a system call per use (per span, on the hot paths).

Kept right across ``os.fork`` (and multiprocessing's fork, as django-q2 starts its workers)
by an after-fork hook; the per-process state of the span store compares against it to know
it runs in a new process.
"""

from __future__ import annotations

import os

_pid = os.getpid()


def _after_fork_in_child() -> None:
    global _pid
    _pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def current_pid() -> int:
    """``os.getpid()``, as of the last fork."""
    return _pid
