"""The Redis backend of the conflict store: one Lua script per batch of keys.

Used for ``django_redis`` caches with the default client, pickle serializer and no
compressor (what powercrud needs anyway: its tracking value is a pickled ``set``). Lock values
are written with the cache client's own ``encode``/``make_key``, so ``cache.get`` (powercrud's
``check_conflict``) reads them back as the holder's task key.

One script per batch (``batch_size`` keys, a few thousand: a script blocks the whole Redis
server while it runs) checks every key, and only if none is held by another task sets the new
ones with ``SET NX PX``, refreshes the TTL of those the task already held and appends the new
lock keys to the task's tracking set, all atomically. A conflict in a later batch rolls the
earlier batches back (compare-and-delete, and their keys leave the tracking set).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from otel_taskctx.conflicts.base import CacheConflictStore, _Group
from otel_taskctx.conflicts.tracking import chunked, encode_tracking, prefixed_chunk

log = logging.getLogger("otel_taskctx.conflicts")

_LUA_COMMON = r"""
local function pickled(k)
  local n = #k
  if n < 256 then return '\140' .. string.char(n) .. k end
  return 'X' .. string.char(n % 256, math.floor(n / 256) % 256,
                            math.floor(n / 65536) % 256, math.floor(n / 16777216) % 256) .. k
end
local function lock_keys(prefix, suffixes, full)
  if full ~= nil and full ~= '' then return cjson.decode(full) end
  local keys = {}
  for i = 1, #suffixes do keys[i] = prefix .. suffixes[i] end
  return keys
end
"""

# Lock keys are not passed as KEYS (packing 10,000 arguments costs more than the script):
# standalone Redis or one shard only, like every multi-key script here.
# KEYS[1] tracking key
# ARGV[1] encoded holder, ARGV[2] ttl in ms (0: none), ARGV[3] prefix of the full lock keys,
# ARGV[4] prefix of powercrud's lock keys (tracking items), ARGV[5] JSON array of id texts,
# ARGV[6] JSON array of full lock keys when they are not ARGV[3] .. id (custom KEY_FUNCTION),
# ARGV[7] the tracking-set chunk adding every lock key of the batch (used when all are new)
# -> {0, {i, holder, ...}}  conflict (nothing written; i indexes the ids from 1)
# -> {1, number of new locks, {i of ids the task already held...}}
# -> {2}  the tracking value is not in an appendable format (nothing written)
RESERVE_LUA = (
    _LUA_COMMON
    + r"""
local holder = ARGV[1]
local ttl = tonumber(ARGV[2])
local px = ARGV[2]  -- passed on as the string it is: no number formatting per key
local ids = cjson.decode(ARGV[5])
local keys = lock_keys(ARGV[3], ids, ARGV[6])
local tk = KEYS[1]
local tlen = redis.call('STRLEN', tk)
local cut = 0
if tlen > 0 then
  local tail = redis.call('GETRANGE', tk, -3, -1)
  local last2 = string.sub(tail, -2)
  if tail == 'N0.' then cut = 3
  elseif last2 == '\144.' or last2 == '\143.' or tail == '\143\148.' then cut = 1
  else return {2} end
end
local conflicts, fresh, held = {}, {}, {}
local values = redis.call('MGET', unpack(keys))  -- batch_size stays below Lua's stack limit
for i = 1, #keys do
  local v = values[i]
  if not v then fresh[#fresh + 1] = i
  elseif v == holder then held[#held + 1] = i
  else conflicts[#conflicts + 1] = i; conflicts[#conflicts + 1] = v end
end
if #conflicts > 0 then return {0, conflicts} end
for _, i in ipairs(fresh) do
  if ttl > 0 then redis.call('SET', keys[i], holder, 'PX', px)
  else redis.call('SET', keys[i], holder) end
end
if ttl > 0 then
  for _, i in ipairs(held) do redis.call('PEXPIRE', keys[i], px) end
end
if #fresh > 0 then
  local chunk = ARGV[7]  -- every id of the batch, prepared by the caller: the usual case
  if #held > 0 then
    local parts = {}
    local rprefix = ARGV[4]
    for _, i in ipairs(fresh) do parts[#parts + 1] = pickled(rprefix .. ids[i]) end
    chunk = '(' .. table.concat(parts) .. '\144'
  end
  chunk = chunk .. 'N0.'
  if tlen == 0 then
    redis.call('SET', tk, '\128\4\143' .. chunk)
  else
    redis.call('SETRANGE', tk, tlen - cut, chunk)
  end
end
if ttl > 0 and (#fresh > 0 or tlen > 0) then
  local pttl = redis.call('PTTL', tk)
  if pttl == -2 or (pttl >= 0 and pttl < ttl) then redis.call('PEXPIRE', tk, ttl) end
end
return {1, #fresh, held}
"""
)

# compare-and-delete: ARGV[1] encoded holder, ARGV[2] JSON array of full keys -> deleted
DELETE_LUA = r"""
local n = 0
for _, k in ipairs(cjson.decode(ARGV[2])) do
  if redis.call('GET', k) == ARGV[1] then redis.call('DEL', k); n = n + 1 end
end
return n
"""

# compare-and-expire: KEYS[1] tracking, ARGV[1] holder, ARGV[2] ttl ms, ARGV[3] JSON keys
REFRESH_LUA = r"""
local n = 0
local ttl = tonumber(ARGV[2])
for _, k in ipairs(cjson.decode(ARGV[3])) do
  if redis.call('GET', k) == ARGV[1] then redis.call('PEXPIRE', k, ARGV[2]); n = n + 1 end
end
local pttl = redis.call('PTTL', KEYS[1])
if pttl >= 0 and pttl < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return n
"""

# delete the tracking key unless it grew since it was read: KEYS[1], ARGV[1] length read
DROP_TRACKING_LUA = r"""
if redis.call('STRLEN', KEYS[1]) == tonumber(ARGV[1]) then
  redis.call('DEL', KEYS[1]); return 1
end
return 0
"""


def _keys(taken: list[tuple[str, list[str]]]) -> list[str]:
    return [prefix + text for prefix, texts in taken for text in texts]


def supports(cache: Any) -> bool:
    """Can the Lua backend serve this cache (django-redis, pickle, no compression)?"""
    if not any(c.__module__.startswith("django_redis.") for c in type(cache).__mro__):
        return False  # not a django-redis cache: no need to import django-redis (and redis)
    try:
        from django_redis.cache import RedisCache
        from django_redis.client import DefaultClient
        from django_redis.client.herd import HerdClient
        from django_redis.client.sharded import ShardClient
        from django_redis.compressors.identity import IdentityCompressor
        from django_redis.serializers.pickle import PickleSerializer
    except ImportError:
        return False
    if not isinstance(cache, RedisCache):
        return False
    client = cache.client
    if not isinstance(client, DefaultClient) or isinstance(client, (ShardClient, HerdClient)):
        return False
    serializer = getattr(client, "_serializer", None)
    compressor = getattr(client, "_compressor", None)
    return type(serializer) is PickleSerializer and type(compressor) is IdentityCompressor


class RedisConflictStore(CacheConflictStore):
    """All-or-nothing reservations in one Lua script per batch of ``batch_size`` keys."""

    kind = "redis"
    #: keys per script: a script blocks the server (~3 ms per 2,000 keys); at most 7,000
    #: (the script passes a batch to MGET in one call)
    batch_size = 2000

    def __init__(self, manager: Any, ttl: int | None = None) -> None:
        super().__init__(manager, ttl)
        self.client = self.cache.client
        redis = self.client.get_client(write=True)
        self._reserve_script = redis.register_script(RESERVE_LUA)
        self._delete_script = redis.register_script(DELETE_LUA)
        self._refresh_script = redis.register_script(REFRESH_LUA)
        self._drop_tracking_script = redis.register_script(DROP_TRACKING_LUA)
        probe = f"{self.model_prefix}probe.model:"
        #: full key == make_key(prefix) + id? (Django's default KEY_FUNCTION): ids only go over
        self._prefix_keys = all(
            self._full(probe + s) == self._full(probe) + s for s in ("1", "x-y", "é")
        )

    def _redis(self) -> Any:
        return self.client.get_client(write=True)

    def _full(self, key: str) -> str:
        return str(self.client.make_key(key))

    def _holder(self, task_key: str) -> bytes:
        return self.client.encode(task_key)

    @property
    def _ttl_ms(self) -> str:
        return str(int(self.ttl * 1000)) if self.ttl else "0"

    # reserve ---------------------------------------------------------------------------------
    def _reserve_groups(
        self, task_key: str, groups: list[_Group]
    ) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
        redis = self._redis()
        holder = self._holder(task_key)
        tracking = self._full(self.tracking_key(task_key))
        fresh: dict[str, list[Any]] = {}
        held: dict[str, list[Any]] = {}
        # new locks so far, as (key prefix, id texts): what a later conflict rolls back
        taken: list[tuple[str, list[str]]] = []
        try:
            for group in groups:
                prefix = self._full(group.prefix) if self._prefix_keys else ""
                for start in range(0, len(group.texts), self.batch_size):
                    texts = group.texts[start : start + self.batch_size]
                    if self._prefix_keys:
                        full = ""
                    else:
                        full = json.dumps([self._full(group.prefix + t) for t in texts])
                    args = [
                        holder,
                        self._ttl_ms,
                        prefix,
                        group.prefix,
                        json.dumps(texts),
                        full,
                        prefixed_chunk(group.prefix, texts),
                    ]
                    reply = self._run_reserve(redis, task_key, tracking, args)
                    obj_ids = group.obj_ids[start : start + self.batch_size]
                    if int(reply[0]) == 0:
                        self._rollback(redis, task_key, holder, _keys(taken))
                        taken = []
                        pairs = reply[1]
                        known = {
                            group.model: {
                                obj_ids[int(pairs[n]) - 1]: str(self.client.decode(pairs[n + 1]))
                                for n in range(0, len(pairs), 2)
                            }
                        }
                        self._raise_conflict(task_key, {g.model: g.obj_ids for g in groups}, known)
                    mine = sorted(int(i) - 1 for i in reply[2])
                    if mine:
                        held.setdefault(group.model, []).extend(obj_ids[i] for i in mine)
                        skip = set(mine)
                        new = [n for n in range(len(texts)) if n not in skip]
                        fresh.setdefault(group.model, []).extend(obj_ids[n] for n in new)
                        taken.append((group.prefix, [texts[n] for n in new]))
                    else:
                        fresh.setdefault(group.model, []).extend(obj_ids)
                        taken.append((group.prefix, texts))
        except BaseException:
            if taken:
                try:
                    self._rollback(redis, task_key, holder, _keys(taken))
                except Exception:  # the locks expire with their TTL
                    log.warning("could not roll back the new locks of task %s", task_key)
            raise
        return fresh, held

    def _run_reserve(self, redis: Any, task_key: str, tracking: str, args: list[Any]) -> Any:
        for _ in range(3):
            reply = self._reserve_script(keys=[tracking], args=args, client=redis)
            if int(reply[0]) != 2:
                return reply
            self._rewrite_tracking(redis, task_key)  # a foreign format: make it appendable
        raise RuntimeError(f"cannot append to the tracking set {tracking}")  # pragma: no cover

    def _delete_mine(self, redis: Any, holder: bytes, keys: list[str]) -> int:
        """Compare-and-delete the (unprefixed) ``keys``; returns how many were deleted."""
        deleted = 0
        for batch in chunked(keys, self.batch_size):
            full = json.dumps([self._full(k) for k in batch])
            deleted += int(self._delete_script(keys=[], args=[holder, full], client=redis))
        return deleted

    def _rollback(self, redis: Any, task_key: str, holder: bytes, keys: list[str]) -> None:
        """Compare-and-delete ``keys`` and take them out of the tracking set."""
        if not keys:
            return
        self._delete_mine(redis, holder, keys)
        self._rewrite_tracking(redis, task_key, remove=set(keys))

    def _rewrite_tracking(self, redis: Any, task_key: str, remove: Any = frozenset()) -> None:
        """Rewrite the tracking set in the appendable format (optimistic, WATCH/MULTI)."""
        from redis.exceptions import WatchError

        tracking = self._full(self.tracking_key(task_key))
        for _ in range(50):
            with redis.pipeline() as pipe:
                try:
                    pipe.watch(tracking)
                    raw = pipe.get(tracking)
                    if raw is None:
                        pipe.unwatch()
                        return
                    current = self.client.decode(raw)
                    wanted = set(current or ()) - set(remove)
                    pipe.multi()
                    pipe.set(tracking, encode_tracking(sorted(wanted)), keepttl=True)
                    pipe.execute()
                    return
                except WatchError:
                    continue
        raise RuntimeError(f"the tracking set {tracking} kept changing")

    # holders / tracking ----------------------------------------------------------------------
    def holders(self, conflict_ids):  # type: ignore[no-untyped-def]
        items = self._items(conflict_ids)
        redis = self.client.get_client(write=False)
        out: dict[str, dict[Any, str]] = {}
        for batch in chunked(items, self.batch_size):
            values = redis.mget([self._full(i.key) for i in batch])
            for item, raw in zip(batch, values, strict=True):
                if raw is not None:
                    out.setdefault(item.model, {})[item.obj_id] = str(self.client.decode(raw))
        return out

    def _tracking_raw(self, redis: Any, task_key: str) -> tuple[bytes | None, set[str]]:
        raw = redis.get(self._full(self.tracking_key(task_key)))
        if raw is None:
            return None, set()
        return raw, set(self.client.decode(raw) or ())

    def tracked_keys(self, task_key: str) -> set[str]:
        return self._tracking_raw(self._redis(), task_key)[1]

    # release / refresh -----------------------------------------------------------------------
    def _release(self, task_key: str) -> int:
        redis = self._redis()
        holder = self._holder(task_key)
        tracking = self._full(self.tracking_key(task_key))
        deleted = 0
        for _ in range(20):
            raw, keys = self._tracking_raw(redis, task_key)
            deleted += self._delete_mine(redis, holder, sorted(keys))
            if raw is None:
                return deleted
            if int(self._drop_tracking_script(keys=[tracking], args=[len(raw)], client=redis)):
                return deleted
        raise RuntimeError(f"task {task_key} kept registering descendants during release")

    def _refresh(self, task_key: str, ttl: int) -> int:
        redis = self._redis()
        holder = self._holder(task_key)
        tracking = self._full(self.tracking_key(task_key))
        keys = sorted(self.tracked_keys(task_key))
        count = 0
        for batch in chunked(keys, self.batch_size) if keys else [[]]:
            full = json.dumps([self._full(k) for k in batch])
            count += int(
                self._refresh_script(
                    keys=[tracking], args=[holder, str(int(ttl * 1000)), full], client=redis
                )
            )
        return count
