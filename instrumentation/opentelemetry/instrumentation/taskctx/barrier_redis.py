"""The fan-out barrier in Redis, beside the locks of a Redis conflict store.

Per job one hash ``<prefix>job:<job key>``: a field ``c:<child>`` per child, ``pending`` (the
children not ended) and, once the job's function ended, ``job``. A sorted set ``<prefix>pending``
holds the pending children by start time, for the sweep. Each step is one Lua script, so a job
is claimed for completion exactly once.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

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
        """A claimed job's record and its failed children; its state is deleted."""
        key = self._job(job_key)
        with self._redis().pipeline(transaction=True) as pipe:
            pipe.hgetall(key)
            pipe.delete(key)
            fields = pipe.execute()[0]
        job, failed = Row("(job)"), []
        for raw_field, raw in fields.items():
            field = raw_field.decode() if isinstance(raw_field, bytes) else str(raw_field)
            if field == "job":
                j = json.loads(raw)
                job = Row("(job)", j.get("f", ""), "done", j.get("e", ""), j.get("r", ""))
            elif field.startswith("c:"):
                c = json.loads(raw)
                if c.get("s") == "failed":
                    failed.append(Row(field[2:], c.get("f", ""), "failed", c.get("e", "")))
        return job, failed

    def any_pending(self) -> bool:
        return bool(self._redis().zcard(self._pending))

    def stale(self, timeout: float) -> list[tuple[str, str]]:
        """``(job key, child name)`` of the children pending for more than ``timeout`` s."""
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
