"""Helpers shared by the reliability tests (tests/test_reliability*.py, tests/test_carriers.py).

Lock inspection works on both stacks: django-redis (key patterns) and otel_taskctx's
DatabaseCache (the rows of the lock model, expired ones included: a leftover is a leftover).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from django.core.cache import caches

LOCK_PREFIX = "powercrud:conflict:model:"
TRACKING_PREFIX = "powercrud:async:conflict:"
APPROVE = "tests.testapp.reliability.approve_parents"


def is_redis(cache: Any) -> bool:
    return type(cache).__module__.startswith("django_redis")


def _db_rows(cache: Any, pattern: str) -> dict[str, Any]:
    """``{key without the cache's prefix: value}`` of every lock row matching ``pattern``."""
    from otel_taskctx.cache import lock_safe, locks

    cache = lock_safe(cache)
    prefix = cache.make_key("")
    rows = locks().filter(cache_key__startswith=prefix + pattern)
    keys = [key[len(prefix) :] for key in rows.values_list("cache_key", flat=True)]
    found = cache.get_many(keys) if keys else {}
    return {k: found.get(k, "<expired>") for k in keys}


def keys_like(prefix: str, alias: str = "default") -> dict[str, Any]:
    """Every key of the cache ``alias`` that starts with ``prefix`` -> its value."""
    cache = caches[alias]
    if is_redis(cache):
        keys = cache.keys(prefix + "*")
        values = cache.get_many(keys) if keys else {}
        return {k: values.get(k, "<expired>") for k in keys}
    return _db_rows(cache, prefix)


def lock_keys(alias: str = "default") -> dict[str, Any]:
    """Every powercrud lock key and tracking set left in the cache."""
    return {**keys_like(LOCK_PREFIX, alias), **keys_like(TRACKING_PREFIX, alias)}


def holders(label: str, ids: Iterable[Any], alias: str = "default") -> dict[Any, str | None]:
    cache = caches[alias]
    ids = list(ids)
    values = cache.get_many([f"{LOCK_PREFIX}{label}:{i}" for i in ids])
    return {i: values.get(f"{LOCK_PREFIX}{label}:{i}") for i in ids}


def lock_ttls(prefix: str = LOCK_PREFIX, alias: str = "default") -> dict[str, float | None]:
    """Seconds left on each lock key (None: no expiry)."""
    cache = caches[alias]
    if is_redis(cache):
        return {k: cache.ttl(k) for k in cache.keys(prefix + "*")}
    from django.utils import timezone

    from otel_taskctx.models import DescendantLock

    now = timezone.now()
    out: dict[str, float | None] = {}
    for row in DescendantLock.objects.filter(cache_key__contains=prefix):
        out[row.cache_key] = (row.expires - now).total_seconds()
    return out


def wait_for_file(path: Path, cluster: Any, timeout: float = 30.0) -> str:
    cluster.wait_for(path.exists, timeout=timeout, what=f"{path.name}")
    return path.read_text()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A private ``redis-server`` (no persistence) on a free port; kill it to fail the cache."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def cache_config(self) -> dict[str, Any]:
        return {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": self.url,
            "OPTIONS": {
                "CLIENT_CLASS": "django_redis.client.DefaultClient",
                "SOCKET_CONNECT_TIMEOUT": 1,
                "SOCKET_TIMEOUT": 2,
            },
        }


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (not reaped yet by its parent) is dead too
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False
