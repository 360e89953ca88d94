"""The fan-out barrier: which children of a job are pending, and the job's one completion
once none is. In Redis where the conflict store is Redis (a hash per job, a Lua script per
step), else in ``FanOutChild`` rows (see docs/fan_out.md).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.core.signals import setting_changed
from django.utils import timezone

log = logging.getLogger("otel_taskctx.instrumentation")

JOB_ROW = "(job)"
_PREFIX = "fan-out-"
_TOKEN_HEX = 16
_NAME_MAX = 64  # FanOutChild.task_id

PREFIX = "otel_taskctx:fan_out:"
KEEP_SECONDS = 7 * 24 * 3600

# KEYS[1] the job's hash, KEYS[2] the pending set
# ARGV[1] child name, ARGV[2] new state, ARGV[3] error, ARGV[4] pending-set member
# -> -1 no such child, 0 recorded (the job is not ready), 1 the job is ready: claimed
CHILD_END_LUA = r"""
local field = 'c:' .. ARGV[1]
local raw = redis.call('HGET', KEYS[1], field)
if not raw then return -1 end
local child = cjson.decode(raw)
if child.s ~= 'pending' then return 0 end
child.s = ARGV[2]
child.e = ARGV[3]
redis.call('HSET', KEYS[1], field, cjson.encode(child))
redis.call('ZREM', KEYS[2], ARGV[4])
if redis.call('HINCRBY', KEYS[1], 'pending', -1) > 0 then return 0 end
local job = redis.call('HGET', KEYS[1], 'job')
if not job then return 0 end
local j = cjson.decode(job)
if j.s ~= 'pending' then return 0 end
j.s = 'completing'
redis.call('HSET', KEYS[1], 'job', cjson.encode(j))
return 1
"""

# KEYS[1] the job's hash; ARGV[1] the job's end as JSON
# -> -1 no child (nothing recorded), 0 recorded (children pending), 1 ready: claimed
JOB_END_LUA = r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local job = redis.call('HGET', KEYS[1], 'job')
if not job then
  job = ARGV[1]
  redis.call('HSET', KEYS[1], 'job', job)
end
if tonumber(redis.call('HGET', KEYS[1], 'pending') or '0') > 0 then return 0 end
local j = cjson.decode(job)
if j.s ~= 'pending' then return 0 end
j.s = 'completing'
redis.call('HSET', KEYS[1], 'job', cjson.encode(j))
return 1
"""


@dataclass
class Row:
    """A record with the fields of ``FanOutChild`` that the completion reads."""

    task_id: str
    func: str = ""
    state: str = "pending"
    error: str = ""
    result_id: str = ""


class RedisBarrier:
    def __init__(self, cache: Any) -> None:
        self.client = cache.client
        redis = self.client.get_client(write=True)
        self._child_end = redis.register_script(CHILD_END_LUA)
        self._job_end = redis.register_script(JOB_END_LUA)
        self._pending = str(self.client.make_key(f"{PREFIX}pending"))

    def _redis(self) -> Any:
        return self.client.get_client(write=True)

    def _job(self, job_key: str) -> str:
        return str(self.client.make_key(f"{PREFIX}job:{job_key}"))

    @staticmethod
    def _member(job_key: str, name: str) -> str:
        return f"{job_key}\n{name}"

    def _name(self, name: str) -> str:
        return str(self.client.make_key(f"{PREFIX}name:{name}"))

    def job_of(self, name: str) -> str | None:
        raw = self._redis().get(self._name(name))
        return raw.decode() if isinstance(raw, bytes) else raw

    def add_child(self, job_key: str, name: str, func: str, named: bool = True) -> None:
        key = self._job(job_key)
        now = time.time()
        with self._redis().pipeline(transaction=True) as pipe:
            if not named:
                pipe.set(self._name(name), job_key, ex=KEEP_SECONDS)
            pipe.hset(key, f"c:{name}", json.dumps({"f": func, "s": "pending", "e": "", "t": now}))
            pipe.hincrby(key, "pending", 1)
            pipe.expire(key, KEEP_SECONDS)
            pipe.zadd(self._pending, {self._member(job_key, name): now})
            pipe.execute()

    def remove_child(self, job_key: str, name: str) -> None:
        key = self._job(job_key)
        with self._redis().pipeline(transaction=True) as pipe:
            pipe.hdel(key, f"c:{name}")
            pipe.hincrby(key, "pending", -1)
            pipe.zrem(self._pending, self._member(job_key, name))
            results = pipe.execute()
        if results[1] <= 0 and self._redis().hlen(key) <= 1:
            self._redis().delete(key)  # only the counter was left: no child any more

    def has_children(self, job_key: str) -> bool:
        return bool(self._redis().exists(self._job(job_key)))

    def child_ended(self, job_key: str, name: str, state: str, error: str) -> int:
        keys = [self._job(job_key), self._pending]
        return int(self._child_end(keys, [name, state, error, self._member(job_key, name)]))

    def job_ended(self, job_key: str, func: str, result_id: str, error: str) -> int:
        job = json.dumps({"s": "pending", "f": func, "r": result_id, "e": error})
        return int(self._job_end([self._job(job_key)], [job]))

    def take(self, job_key: str) -> tuple[Row, list[Row]]:
        key = self._job(job_key)
        with self._redis().pipeline(transaction=True) as pipe:
            pipe.hgetall(key)
            pipe.delete(key)
            fields = pipe.execute()[0]
        job, failed = Row(JOB_ROW), []
        for raw_field, raw in fields.items():
            field = raw_field.decode() if isinstance(raw_field, bytes) else str(raw_field)
            if field == "job":
                j = json.loads(raw)
                job = Row(JOB_ROW, j.get("f", ""), "done", j.get("e", ""), j.get("r", ""))
            elif field.startswith("c:"):
                c = json.loads(raw)
                if c.get("s") == "failed":
                    failed.append(Row(field[2:], c.get("f", ""), "failed", c.get("e", "")))
        return job, failed

    def any_pending(self) -> bool:
        return bool(self._redis().zcard(self._pending))

    def stale(self, timeout: float) -> list[tuple[str, str]]:
        members = self._redis().zrangebyscore(self._pending, "-inf", time.time() - timeout)
        out = []
        for member in members:
            text = member.decode() if isinstance(member, bytes) else str(member)
            job_key, _, name = text.partition("\n")
            out.append((job_key, name))
        return out

    def discard(self, job_key: str) -> None:
        key = self._job(job_key)
        names = [f.decode()[2:] for f in self._redis().hkeys(key) if f.startswith(b"c:")]
        if names:
            self._redis().zrem(self._pending, *(self._member(job_key, n) for n in names))
        self._redis().delete(key)


class DatabaseBarrier:
    """The barrier in :class:`otel_taskctx.models.FanOutChild` rows."""

    def __init__(self) -> None:
        from otel_taskctx.models import FanOutChild

        self.rows = FanOutChild.objects
        self.claimed: dict[str, list[Any]] = {}

    def job_of(self, name: str) -> str | None:
        return self.rows.filter(task_id=name).values_list("job_key", flat=True).first()

    def add_child(self, job_key: str, name: str, func: str, named: bool = True) -> None:
        self.rows.create(job_key=job_key, task_id=name, func=func)

    def remove_child(self, job_key: str, name: str) -> None:
        self.rows.filter(job_key=job_key, task_id=name).delete()

    def has_children(self, job_key: str) -> bool:
        return self.rows.filter(job_key=job_key).exclude(task_id=JOB_ROW).exists()

    def child_ended(self, job_key: str, name: str, state: str, error: str) -> int:
        rows = self.rows.filter(job_key=job_key, task_id=name)
        if not rows.filter(state="pending").update(
            state=state, error=error, finished_at=timezone.now()
        ):
            return 0 if rows.exists() else -1
        return self._claim(job_key)

    def job_ended(self, job_key: str, func: str, result_id: str, error: str) -> int:
        if not self.has_children(job_key):
            return -1
        fields = {"func": func, "result_id": result_id, "error": error}
        self.rows.get_or_create(job_key=job_key, task_id=JOB_ROW, defaults=fields)
        return self._claim(job_key)

    def _claim(self, job_key: str) -> int:
        """1 (once) when the job's function ended and no child is pending; rows for take()."""
        from django.db import transaction

        pending = self.rows.filter(job_key=job_key, state="pending")
        if list(pending.values_list("task_id", flat=True)[:2]) != [JOB_ROW]:
            return 0
        with transaction.atomic(using=self.rows.db):
            rows = list(self.rows.select_for_update().filter(job_key=job_key))
            job = [r for r in rows if r.task_id == JOB_ROW and r.state == "pending"]
            if not job or any(r.state == "pending" for r in rows if r is not job[0]):
                return 0
            self.rows.filter(job_key=job_key).delete()
        self.claimed[job_key] = rows
        return 1

    def take(self, job_key: str) -> tuple[Any, list[Any]]:
        rows = self.claimed.pop(job_key)
        job = next(r for r in rows if r.task_id == JOB_ROW)
        return job, [r for r in rows if r.state == "failed" and r is not job]

    def any_pending(self) -> bool:
        return self.rows.filter(state="pending").exclude(task_id=JOB_ROW).exists()

    def stale(self, timeout: float) -> list[tuple[str, str]]:
        since = timezone.now() - timedelta(seconds=timeout)
        rows = self.rows.filter(state="pending", created_at__lt=since).exclude(task_id=JOB_ROW)
        return list(rows.values_list("job_key", "task_id"))

    def discard(self, job_key: str) -> None:
        self.rows.filter(job_key=job_key).delete()


_stores: dict[int, Any] = {}


def _forget_store(setting: str = "", **kwargs: Any) -> None:
    if setting in ("CACHES", "OTEL_TASKCTX", "POWERCRUD_SETTINGS"):
        _stores.clear()


setting_changed.connect(_forget_store, dispatch_uid="otel_taskctx.fan_out_barrier")


def store() -> Any:
    """The Redis barrier where the conflict store is Redis, else the database's (per process)."""
    found = _stores.get(os.getpid())
    if found is None:
        found = None
        try:
            from django.core.cache import caches

            from otel_taskctx.conflicts.redis_store import supports
            from otel_taskctx.task_manager import tasks_cache_alias

            cache = caches[tasks_cache_alias()]
            found = RedisBarrier(cache) if supports(cache) else None
        except Exception:  # no such cache: the database holds the barrier
            log.debug("fan-out barrier: no Redis conflict store", exc_info=True)
        _stores.clear()
        found = _stores[os.getpid()] = found or DatabaseBarrier()
    return found


def child_name(job_key: str) -> str:
    """A new child's name: unique, and carrying ``job_key`` when it fits."""
    name = f"{_PREFIX}{uuid.uuid4().hex[:_TOKEN_HEX]}-{job_key}"
    return name if len(name) <= _NAME_MAX else f"{_PREFIX}{uuid.uuid4().hex}"


def job_of_name(name: str) -> str | None:
    """The job key a :func:`child_name` carries (None for the long-key form)."""
    cut = len(_PREFIX) + _TOKEN_HEX
    if name.startswith(_PREFIX) and len(name) > cut + 1 and name[cut] == "-":
        return name[cut + 1 :]
    return None


#: jobs this process launched fanned-out children for: only their ends ask the barrier
launched: set[str] = set()


def add_child(job_key: str, name: str, func: str) -> None:
    """The pending record of a child about to be enqueued."""
    launched.add(job_key)
    store().add_child(job_key, name, func[:255], named=job_of_name(name) == job_key)


@contextmanager
def new_child(identity: Any, func: str) -> Iterator[tuple[str, Any]]:
    """The pending record of a child of ``identity``'s job for the enqueue in the block
    (removed if it fails): ``(its name, its identity)``."""
    name = child_name(identity.task_key)
    add_child(identity.task_key, name, func)
    try:
        yield name, identity.child(identity.task_key, identity.manager_class_path)
    except BaseException:
        remove_child(identity.task_key, name)
        raise
    from opentelemetry.instrumentation.taskctx import sweeper

    sweeper.ensure_running()


def remove_child(job_key: str, name: str) -> None:
    """Undo :func:`add_child`: the child could not be enqueued."""
    store().remove_child(job_key, name)


def has_children(job_key: str) -> bool:
    return store().has_children(job_key)


def child_ended(name: str, error: str, what: str = "") -> str | None:
    """Record a child's end (``error`` empty: success), completing its job after the last;
    the job's key (None: no such record)."""
    barrier = store()
    job_key = job_of_name(name) or barrier.job_of(name)
    state = "failed" if error else "done"
    claimed = barrier.child_ended(job_key, name, state, error[:4000]) if job_key else -1
    if claimed == -1:
        log.warning("fan-out child %s (%s) has no barrier record", name, what)
        return None
    if claimed == 1:
        complete(job_key, *barrier.take(job_key))
    return job_key


def job_ended(job_key: str, func: str, result_id: str = "", error: str = "") -> bool:
    """The job's function ended: False without fanned-out children or with the barrier
    unreachable (the caller completes it now), else the barrier completes it after them."""
    launched.discard(job_key)
    try:
        barrier = store()
        claimed = barrier.job_ended(job_key, func[:255], result_id, error[:4000])
    except Exception:
        log.warning("could not check the fan-out children of job %s", job_key, exc_info=True)
        return False
    if claimed == 1:
        complete(job_key, *barrier.take(job_key))
    elif claimed == 0:  # the sweeper fails its lost children while it waits
        from opentelemetry.instrumentation.taskctx import sweeper

        sweeper.ensure_running()
    return claimed != -1


def discard(job_key: str) -> None:
    """Forget a job's barrier state without completing it (benchmarks)."""
    store().discard(job_key)


def failure_message(failed: list[Any]) -> str:
    first = failed[0]
    more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
    return f"fan-out child {first.func} (task {first.task_id}) failed: {first.error}{more}"


def complete(job_key: str, job: Any, failed: list[Any]) -> None:
    """Complete a fanned-out job after its last child: a ``django.tasks`` job's locks and held
    result; a django-q2 job through powercrud's completion hook."""
    try:
        if job.result_id:
            from opentelemetry.instrumentation.taskctx import runs, tasks_carriers

            try:
                runs.release_locks(job_key)
            finally:
                tasks_carriers.finish_result(job, failure_message(failed) if failed else "")
            return
        from django_q.models import Task
        from powercrud import async_hooks

        if failed:
            Task.objects.filter(name=job_key).update(success=False, result=failure_message(failed))
        task = Task.objects.filter(name=job_key).order_by("-stopped").first()
        if task is not None:
            async_hooks.task_completion_hook(task)
    except Exception:
        log.exception("could not complete fan-out job %s", job_key)
