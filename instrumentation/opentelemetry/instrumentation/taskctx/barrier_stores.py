"""The fan-out barrier's two stores, one interface: a Redis hash per job with a Lua script
per step (where the conflict store is Redis), else ``FanOutChild`` rows (docs/fan_out.md).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.utils import timezone

JOB_ROW = "(job)"
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


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisBarrier:
    def __init__(self, cache: Any) -> None:
        self.client = cache.client
        self.redis = self.client.get_client(write=True)
        self._child_end = self.redis.register_script(CHILD_END_LUA)
        self._job_end = self.redis.register_script(JOB_END_LUA)
        self._pending = self._key("pending")

    def _key(self, name: str) -> str:
        return str(self.client.make_key(f"{PREFIX}{name}"))

    @staticmethod
    def _member(job_key: str, name: str) -> str:
        return f"{job_key}\n{name}"

    def job_of(self, name: str) -> str | None:
        raw = self.redis.get(self._key(f"name:{name}"))
        return None if raw is None else _text(raw)

    def add_child(self, job_key: str, name: str, func: str, named: bool = True) -> None:
        key, now = self._key(f"job:{job_key}"), time.time()
        with self.redis.pipeline(transaction=True) as pipe:
            if not named:
                pipe.set(self._key(f"name:{name}"), job_key, ex=KEEP_SECONDS)
            pipe.hset(key, f"c:{name}", json.dumps({"f": func, "s": "pending", "e": "", "t": now}))
            pipe.hincrby(key, "pending", 1)
            pipe.expire(key, KEEP_SECONDS)
            pipe.zadd(self._pending, {self._member(job_key, name): now})
            pipe.execute()

    def remove_child(self, job_key: str, name: str) -> None:
        key = self._key(f"job:{job_key}")
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(key, f"c:{name}")
            pipe.hincrby(key, "pending", -1)
            pipe.zrem(self._pending, self._member(job_key, name))
            results = pipe.execute()
        if results[1] <= 0 and self.redis.hlen(key) <= 1:
            self.redis.delete(key)  # only the counter was left: no child any more

    def has_children(self, job_key: str) -> bool:
        return bool(self.redis.exists(self._key(f"job:{job_key}")))

    def child_ended(self, job_key: str, name: str, state: str, error: str) -> int:
        keys = [self._key(f"job:{job_key}"), self._pending]
        return int(self._child_end(keys, [name, state, error, self._member(job_key, name)]))

    def job_ended(self, job_key: str, func: str, result_id: str, error: str) -> int:
        job = json.dumps({"s": "pending", "f": func, "r": result_id, "e": error})
        return int(self._job_end([self._key(f"job:{job_key}")], [job]))

    def take(self, job_key: str) -> tuple[Row, list[Row]]:
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(key := self._key(f"job:{job_key}"))
            pipe.delete(key)
            fields = pipe.execute()[0]
        job, failed = Row(JOB_ROW), []
        for field, raw in ((_text(f), json.loads(v)) for f, v in fields.items()):
            if field == "job":
                job = Row(JOB_ROW, raw.get("f", ""), "done", raw.get("e", ""), raw.get("r", ""))
            elif field.startswith("c:") and raw.get("s") == "failed":
                failed.append(Row(field[2:], raw.get("f", ""), "failed", raw.get("e", "")))
        return job, failed

    def any_pending(self) -> bool:
        return bool(self.redis.zcard(self._pending))

    def stale(self, timeout: float) -> list[tuple[str, str]]:
        members = self.redis.zrangebyscore(self._pending, "-inf", time.time() - timeout)
        return [tuple(_text(member).split("\n", 1)) for member in members]

    def discard(self, job_key: str) -> None:
        key = self._key(f"job:{job_key}")
        names = [f.decode()[2:] for f in self.redis.hkeys(key) if f.startswith(b"c:")]
        if names:
            self.redis.zrem(self._pending, *(self._member(job_key, n) for n in names))
        self.redis.delete(key)


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
