"""The Redis backend of the conflict store: Lua scripts on django-redis' own client.

One script per ``batch_size`` ids takes the locks only if none is held by another task (a
conflict in a later batch rolls the earlier ones back); then one script appends the new lock
keys to the task's tracking set. That set is the pickled ``set`` powercrud reads with
``cache.get``: a set's pickle ends in its STOP byte, so appending is replacing that byte by
``MARK, key..., ADDITEMS, STOP`` (``SETRANGE``), whoever wrote the set.
"""

from __future__ import annotations

import json
import pickle
from itertools import batched
from typing import Any

from otel_taskctx.conflicts.base import CacheConflictStore, Item, log
from otel_taskctx.errors import ConflictStoreUnavailable

# KEYS: none (the lock keys go as ARGV: one server, not Redis Cluster). ARGV[1] encoded holder,
# ARGV[2] TTL in ms ("0": none), ARGV[3] full key prefix of the ids, ARGV[4] JSON id texts,
# ARGV[5] JSON full keys instead (a custom KEY_FUNCTION)
# -> {0, {i, holder, ...}}: a conflict, nothing written; {1, {i of ids the task held...}}
RESERVE_LUA = r"""
local holder, px = ARGV[1], ARGV[2]
local keys = cjson.decode(ARGV[5] ~= '' and ARGV[5] or ARGV[4])
if ARGV[5] == '' then for i = 1, #keys do keys[i] = ARGV[3] .. keys[i] end end
local values = redis.call('MGET', unpack(keys))
local conflicts, held = {}, {}
for i = 1, #keys do
  local v = values[i]
  if v == holder then held[#held + 1] = i
  elseif v then conflicts[#conflicts + 1] = i; conflicts[#conflicts + 1] = v end
end
if #conflicts > 0 then return {0, conflicts} end
for i = 1, #keys do
  if not values[i] and px ~= '0' then redis.call('SET', keys[i], holder, 'PX', px)
  elseif not values[i] then redis.call('SET', keys[i], holder)
  elseif px ~= '0' then redis.call('PEXPIRE', keys[i], px) end
end
return {1, held}
"""

# KEYS[1] tracking key; ARGV[1] TTL in ms ("0": none), ARGV[2] JSON lock keys to add -> 1, or 0
# when the value there is not a pickle (nothing written)
APPEND_LUA = r"""
local parts = {'('}  -- MARK, BINUNICODE key..., ADDITEMS, STOP
for _, k in ipairs(cjson.decode(ARGV[2])) do
  parts[#parts + 1] = 'X' .. struct.pack('<I4', #k) .. k
end
parts[#parts + 1] = '\144.'
local chunk = table.concat(parts)
local size = redis.call('STRLEN', KEYS[1])
if size == 0 then
  redis.call('SET', KEYS[1], '\128\4\143' .. chunk)
elseif redis.call('GETRANGE', KEYS[1], -1, -1) == '.' then
  redis.call('SETRANGE', KEYS[1], size - 1, chunk)
else return 0 end
local pttl = redis.call('PTTL', KEYS[1])
if ARGV[1] ~= '0' and (pttl == -1 and size == 0 or pttl >= 0 and pttl < tonumber(ARGV[1])) then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return 1
"""

# compare-and-act: KEYS[1] tracking key; ARGV[1] "del" or a TTL in ms, ARGV[2] holder, ARGV[3]
# JSON full lock keys, ARGV[4] the tracking value's length as read ("" keeps it) -> {count, 1},
# or {count, 0} when the tracking set grew since it was read (it is kept)
ON_MINE_LUA = r"""
local n = 0
for _, k in ipairs(cjson.decode(ARGV[3])) do
  if redis.call('GET', k) == ARGV[2] then
    if ARGV[1] == 'del' then redis.call('DEL', k) else redis.call('PEXPIRE', k, ARGV[1]) end
    n = n + 1
  end
end
if ARGV[1] ~= 'del' then
  local pttl = redis.call('PTTL', KEYS[1])
  if pttl >= 0 and pttl < tonumber(ARGV[1]) then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
elseif ARGV[4] ~= '' then
  if redis.call('STRLEN', KEYS[1]) ~= tonumber(ARGV[4]) then return {n, 0} end
  redis.call('DEL', KEYS[1])
end
return {n, 1}
"""


def supports(cache: Any) -> bool:
    """A django-redis cache with its default client, reading and writing plain pickles?"""
    if not any(c.__module__.startswith("django_redis.") for c in type(cache).__mro__):
        return False  # not a django-redis cache: no need to import django-redis (and redis)
    try:
        from django_redis.cache import RedisCache
        from django_redis.client import DefaultClient, HerdClient, ShardClient

        client = cache.client
        if not isinstance(cache, RedisCache) or not isinstance(client, DefaultClient):
            return False
        if isinstance(client, (ShardClient, HerdClient)):
            return False
        # the serializer and compressor, by their behaviour: pickle, nothing compressed
        return pickle.loads(client.encode("x")) == "x" and client.decode(pickle.dumps({1})) == {1}
    except Exception:
        return False


class RedisConflictStore(CacheConflictStore):
    """All-or-nothing reservations in one Lua script per batch of ``batch_size`` ids (a script
    blocks the server: ~3 ms per 2,000 keys; at most 7,000, passed to one MGET)."""

    kind = "redis"
    batch_size = 2000

    def __init__(self, manager: Any, ttl: int | None = None) -> None:
        super().__init__(manager, ttl)
        self.client = self.cache.client
        self.redis = self.client.get_client(write=True)
        self._reserve_script = self.redis.register_script(RESERVE_LUA)
        self._append_script = self.redis.register_script(APPEND_LUA)
        self._on_mine_script = self.redis.register_script(ON_MINE_LUA)
        make_key = self.cache.make_key
        probe = f"{self.model_prefix}probe.model:"
        #: full key == make_key(prefix) + id (the default KEY_FUNCTION): only ids go over
        self._by_prefix = all(make_key(probe + s) == make_key(probe) + s for s in ("1", "é"))

    def _ms(self, ttl: int | None) -> str:
        return str(int(ttl * 1000)) if ttl else "0"

    def _full(self, keys: list[str]) -> str:
        return json.dumps([self.cache.make_key(k) for k in keys])

    def _reserve(self, task_key: str, items: list[Item]) -> tuple[list[Item], list[Item]]:
        holder = self.client.encode(task_key)
        fresh: list[Item] = []
        held: list[Item] = []
        try:
            for model in dict.fromkeys(i.model for i in items):
                group = [i for i in items if i.model == model]
                prefix = self.cache.make_key(f"{self.model_prefix}{model}:")
                for batch in batched(group, self.batch_size):
                    texts = json.dumps([i.text for i in batch])
                    full = "" if self._by_prefix else self._full([i.key for i in batch])
                    args = [holder, self._ms(self.ttl), prefix, texts, full]
                    reply = self._reserve_script(args=args, client=self.redis)
                    if not int(reply[0]):
                        pairs = reply[1]
                        known = {
                            batch[int(pairs[n]) - 1].obj_id: str(self.client.decode(pairs[n + 1]))
                            for n in range(0, len(pairs), 2)
                        }
                        raise self.conflict(task_key, items, {model: known})
                    mine = {int(i) - 1 for i in reply[1]}
                    for n, item in enumerate(batch):
                        (held if n in mine else fresh).append(item)
            tracking = self.cache.make_key(self.tracking_key(task_key))
            args = [self._ms(self.ttl), json.dumps([i.key for i in fresh])]
            if fresh and not self._append_script(keys=[tracking], args=args, client=self.redis):
                raise ConflictStoreUnavailable(f"the tracking set {tracking} is not a pickle")
        except BaseException:
            try:  # compare-and-delete what this call took
                if fresh:
                    self._on_mine(task_key, "del", [i.key for i in fresh], "")
            except Exception:  # the locks expire with their TTL
                log.warning("could not roll back the new locks of task %s", task_key)
            raise
        return fresh, held

    def _on_mine(self, task_key: str, op: str, keys: list[str], size: Any) -> tuple[int, bool]:
        """Compare-and-act (delete or expire) on ``keys``; the tracking key last."""
        tracking = self.cache.make_key(self.tracking_key(task_key))
        holder, count, done = self.client.encode(task_key), 0, True
        batches = list(batched(keys, self.batch_size)) or [()]
        for n, batch in enumerate(batches):
            last = n == len(batches) - 1
            args = [op, holder, self._full(list(batch)), size if last else ""]
            reply = self._on_mine_script(keys=[tracking], args=args, client=self.redis)
            count, done = count + int(reply[0]), bool(int(reply[1]))
        return count, done

    def _release(self, task_key: str) -> int:
        tracking, count = self.cache.make_key(self.tracking_key(task_key)), 0
        for _ in range(20):  # again while the task registers more during its release
            raw = self.redis.get(tracking)
            keys = sorted(self.client.decode(raw)) if raw is not None else []
            deleted, done = self._on_mine(task_key, "del", keys, "" if raw is None else len(raw))
            count += deleted
            if done:
                return count
        raise RuntimeError(f"task {task_key} kept registering descendants during release")

    def _refresh(self, task_key: str, ttl: int) -> int:
        return self._on_mine(task_key, self._ms(ttl), sorted(self.tracked_keys(task_key)), "")[0]
