"""The Redis state backend: limits, sessions and cached answers shared by every replica.

Every call has a short timeout. When Redis fails, the gateway keeps serving from a local
`MemoryState` (the rate limiter then scales limits to the replica's local share), `redis_up`
reads 0, one warning is logged per outage, and a probe brings the
shared state back within a second of Redis returning. No request fails because Redis did.
A concurrency slot is given back where it was taken: in Redis (once it returns, if it is away
when the request ends), or in the local state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from router.state.backend import BucketResult
from router.state.memory import MemoryState
from router.state.redis_client import REDIS_FAILURES, RedisClient, connect
from router.supervisor import Supervisor

log = logging.getLogger("prefix_router.state")
T = TypeVar("T")
Slot = tuple[str, str]  # (key, holder)
# Bounds on the slots remembered across an outage; past them the slot's TTL frees it.
_MAX_REMEMBERED_SLOTS = 100_000
_RELEASE_BATCH = 1000

# Token bucket, atomic: refill by elapsed time (Redis clock), take `cost` if it fits (or always,
# when reconciling usage), never above `burst`. Returns allowed and the tokens left as a string
# (Lua numbers would be truncated to integers on the way out).
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local force = tonumber(ARGV[4])
local v = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(v[1])
local ts = tonumber(v[2])
if tokens == nil then tokens = burst; ts = now end
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local allowed = 0
if force == 1 or tokens >= cost then
  tokens = math.min(burst, tokens - cost)
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {allowed, tostring(tokens)}
"""

# Concurrency slots: a sorted set of holders scored by their expiry, so a replica that dies
# holding slots cannot leak them for longer than the TTL.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""


class RedisState:
    def __init__(
        self,
        url: str,
        timeout_s: float,
        *,
        cluster: bool = False,
        on_up_change: Callable[[bool], None] | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        self._url = url
        self._timeout_s = timeout_s
        self._cluster = cluster
        self._local = MemoryState()
        self._on_up_change = on_up_change
        self._supervisor = supervisor
        self._client: RedisClient | None = None
        self._up = False
        self._probe: asyncio.Task[None] | None = None
        self._take: Any = None
        self._acquire: Any = None
        # Slots taken while Redis was known to be away never reached it. Any other slot may be
        # in Redis, even one whose call timed out (the command can still land), so its release
        # goes there too, and waits in `_unreleased` while Redis is away.
        self._local_only: OrderedDict[Slot, None] = OrderedDict()
        self._unreleased: OrderedDict[Slot, None] = OrderedDict()

    @property
    def shared(self) -> bool:
        return self._up

    @property
    def redis_url(self) -> str:
        return self._url

    @property
    def cluster(self) -> bool:
        return self._cluster

    @property
    def client(self) -> RedisClient | None:
        return self._client if self._up else None

    async def start(self) -> None:
        # No hidden retries (`connect`): a failed call falls back at once.
        self._client = connect(self._url, cluster=self._cluster, timeout_s=self._timeout_s)
        self._take = self._client.register_script(_TAKE)
        self._acquire = self._client.register_script(_ACQUIRE)
        await self._check()
        self._probe = (
            self._supervisor.start("redis_probe", self._probe_forever)
            if self._supervisor is not None
            else asyncio.create_task(self._probe_forever())
        )

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        if self._client is not None:
            # Closing must not wait on a Redis that went away (the gateway is shutting down).
            with contextlib.suppress(*REDIS_FAILURES):
                async with asyncio.timeout(1.0):
                    await self._client.aclose()

    async def _check(self) -> None:
        assert self._client is not None
        try:
            async with asyncio.timeout(self._timeout_s * 4):
                await self._client.ping()
        except REDIS_FAILURES as exc:
            self._set_up(False, exc)
        else:
            self._set_up(True, None)

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(0.25 if not self._up else 1.0)
            await self._check()
            if self._up and self._unreleased:
                await self._release_in_redis()

    async def _release_in_redis(self) -> None:
        """Give back, now that Redis is here again, the slots that ended while it was away."""
        client = self._client
        assert client is not None
        batch = list(self._unreleased)[:_RELEASE_BATCH]
        pipe = client.pipeline(transaction=False)
        for key, holder in batch:
            pipe.zrem(key, holder)
        if await self._call(pipe.execute) is not None:
            for slot in batch:
                self._unreleased.pop(slot, None)

    def _set_up(self, up: bool, exc: BaseException | None) -> None:
        if up == self._up:
            return
        self._up = up
        if up:
            log.info("redis is reachable at %s: sharing state again", _safe(self._url))
        else:
            log.warning(
                "redis unreachable (%s): serving from local state until it returns",
                type(exc).__name__ if exc else "unknown",
            )
        if self._on_up_change is not None:
            self._on_up_change(up)

    async def _call(self, make: Callable[[], Awaitable[T]]) -> T | None:
        """Run one Redis call within the timeout; None (and Redis marked down) on failure."""
        if not self._up:
            return None
        try:
            async with asyncio.timeout(self._timeout_s):
                return await make()
        except REDIS_FAILURES as exc:
            self._set_up(False, exc)
            return None

    async def take(
        self, key: str, rate_per_s: float, burst: float, cost: float, *, force: bool = False
    ) -> BucketResult:
        reply = await self._call(
            lambda: self._take(keys=[key], args=[rate_per_s, burst, cost, int(force)])
        )
        if reply is None:
            return self._local.take_now(key, rate_per_s, burst, cost, force)
        allowed, tokens = bool(int(reply[0])), float(reply[1])
        # The local twin follows the shared level: a blip falls back to what is left, not to
        # a fresh burst for every tenant.
        self._local.set_level(key, tokens)
        retry = 0.0 if allowed else (cost - tokens) / rate_per_s
        return BucketResult(allowed, max(0.0, tokens), retry, max(0.0, burst - tokens) / rate_per_s)

    async def give_back(self, key: str, rate_per_s: float, burst: float, amount: float) -> None:
        await self.take(key, rate_per_s, burst, -amount, force=True)

    async def acquire_slot(self, key: str, limit: int, holder: str, ttl_s: float) -> bool:
        if not self._up:
            taken = await self._local.acquire_slot(key, limit, holder, ttl_s)
            if taken:
                _remember(self._local_only, (key, holder))
            return taken
        reply = await self._call(
            lambda: self._acquire(keys=[key], args=[limit, holder, int(ttl_s * 1000)])
        )
        if reply is None:
            return await self._local.acquire_slot(key, limit, holder, ttl_s)
        taken = bool(int(reply))
        if taken:
            # Counted locally too: during an outage this replica's own requests still in
            # flight count against the share it then enforces.
            self._local.hold_slot(key, holder, ttl_s)
        return taken

    async def release_slot(self, key: str, holder: str) -> None:
        slot = (key, holder)
        await self._local.release_slot(key, holder)  # taken here, or its mirror
        if slot in self._local_only:
            del self._local_only[slot]
            return
        client = self._client
        if client is not None and await self._call(lambda: client.zrem(key, holder)) is not None:
            return
        _remember(self._unreleased, slot)

    async def get_session(self, key: str) -> str | None:
        client = self._client
        value = await self._call(lambda: client.get(key)) if client else None
        if value is None:
            return await self._local.get_session(key)
        return value.decode() if isinstance(value, bytes) else str(value)

    async def set_session(self, key: str, worker_id: str, ttl_s: float) -> None:
        await self._local.set_session(key, worker_id, ttl_s)
        client = self._client
        if client is not None:
            await self._call(lambda: client.set(key, worker_id, px=int(ttl_s * 1000)))

    async def cache_get(self, key: str) -> bytes | None:
        client = self._client
        value = await self._call(lambda: client.get(key)) if client else None
        if isinstance(value, bytes):
            return value
        return await self._local.cache_get(key)

    async def cache_set(self, key: str, value: bytes, ttl_s: float) -> None:
        client = self._client
        if (
            client is None
            or await self._call(lambda: client.set(key, value, px=int(ttl_s * 1000))) is None
        ):
            await self._local.cache_set(key, value, ttl_s)


def _remember(slots: OrderedDict[Slot, None], slot: Slot) -> None:
    slots[slot] = None
    if len(slots) > _MAX_REMEMBERED_SLOTS:
        slots.popitem(last=False)


def stop_if_cancelled() -> None:
    """Re-raise a cancellation that redis-py turned into an error or swallowed: without this, a
    background task cancelled mid-command may never stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _safe(url: str) -> str:
    """A Redis URL without its password, for logs."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
