"""The in-memory state backend: one process, no Redis, everything bounded and evicting."""

from __future__ import annotations

import time
from collections import OrderedDict

from router.expiring import ExpiringLRU
from router.state.backend import BucketResult


class MemoryState:
    def __init__(
        self,
        max_entries: int = 100_000,
        max_cache_entries: int = 4096,
        max_entry_bytes: int = 4 << 20,
    ) -> None:
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._slots: dict[str, dict[str, float]] = {}
        self._sessions: ExpiringLRU[str] = ExpiringLRU(max_entries)
        self._cache: ExpiringLRU[bytes] = ExpiringLRU(max_cache_entries)
        self._max_entry_bytes = max_entry_bytes
        self._max_entries = max_entries

    @property
    def shared(self) -> bool:
        return False

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def take_now(
        self, key: str, rate_per_s: float, burst: float, cost: float, force: bool = False
    ) -> BucketResult:
        now = time.monotonic()
        tokens, stamp = self._buckets.get(key, (burst, now))
        tokens = min(burst, tokens + (now - stamp) * rate_per_s)
        allowed = force or tokens >= cost
        if allowed:
            tokens -= cost
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self._max_entries:
            self._buckets.popitem(last=False)
        retry = 0.0 if allowed else (cost - tokens) / rate_per_s
        reset = max(0.0, (burst - tokens) / rate_per_s)
        return BucketResult(allowed, max(0.0, tokens), retry, reset)

    def set_level(self, key: str, tokens: float) -> None:
        """Mirror a shared bucket's level (Redis told it), so a fallback to this one goes on
        from there instead of from a full bucket."""
        self._buckets[key] = (max(0.0, tokens), time.monotonic())
        self._buckets.move_to_end(key)
        while len(self._buckets) > self._max_entries:
            self._buckets.popitem(last=False)

    def hold_slot(self, key: str, holder: str, ttl_s: float) -> None:
        """Mirror a slot taken in the shared backend, so local counting includes it."""
        self._slots.setdefault(key, {})[holder] = time.monotonic() + ttl_s

    async def take(
        self, key: str, rate_per_s: float, burst: float, cost: float, *, force: bool = False
    ) -> BucketResult:
        return self.take_now(key, rate_per_s, burst, cost, force)

    async def give_back(self, key: str, rate_per_s: float, burst: float, amount: float) -> None:
        now = time.monotonic()
        tokens, stamp = self._buckets.get(key, (burst, now))
        tokens = min(burst, tokens + (now - stamp) * rate_per_s + amount)
        self._buckets[key] = (tokens, now)

    async def acquire_slot(self, key: str, limit: int, holder: str, ttl_s: float) -> bool:
        now = time.monotonic()
        holders = self._slots.setdefault(key, {})
        for stale in [h for h, expires in holders.items() if expires <= now]:
            del holders[stale]
        if len(holders) >= limit:
            return False
        holders[holder] = now + ttl_s
        return True

    async def release_slot(self, key: str, holder: str) -> None:
        holders = self._slots.get(key)
        if holders is not None:
            holders.pop(holder, None)
            if not holders:
                del self._slots[key]

    async def get_session(self, key: str) -> str | None:
        return self._sessions.get(key)

    async def set_session(self, key: str, worker_id: str, ttl_s: float) -> None:
        self._sessions.put(key, worker_id, ttl_s)

    async def cache_get(self, key: str) -> bytes | None:
        return self._cache.get(key)

    async def cache_set(self, key: str, value: bytes, ttl_s: float) -> None:
        if len(value) > self._max_entry_bytes:
            return  # entries x this bound the cache's memory
        self._cache.put(key, value, ttl_s)
