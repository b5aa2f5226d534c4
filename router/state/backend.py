"""The state interface every backend implements: what gateway replicas share.

`MemoryState` serves one process with no Redis (the embedded default). `RedisState` shares the
same operations between replicas and falls back to a local `MemoryState` while Redis is away.
Key names come from `router.state.keys`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from router.state.redis_client import RedisClient


@dataclass(frozen=True, slots=True)
class BucketResult:
    """The outcome of taking from a token bucket."""

    allowed: bool
    remaining: float
    retry_after_s: float
    """When denied: how long until `cost` would fit. When allowed: 0."""
    reset_s: float
    """How long until the bucket is full again."""


class StateBackend(Protocol):
    @property
    def shared(self) -> bool:
        """True when the state is shared with other replicas right now (Redis up)."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def take(
        self, key: str, rate_per_s: float, burst: float, cost: float, *, force: bool = False
    ) -> BucketResult:
        """Take `cost` from the bucket `key` (refilled at `rate_per_s`, at most `burst`).

        With `force`, take it even if it goes negative (reconciling actual usage)."""
        ...

    async def give_back(self, key: str, rate_per_s: float, burst: float, amount: float) -> None:
        """Return unused pre-charged tokens."""
        ...

    async def acquire_slot(self, key: str, limit: int, holder: str, ttl_s: float) -> bool:
        """Take one of `limit` concurrent slots; a holder that never releases expires."""
        ...

    async def release_slot(self, key: str, holder: str) -> None: ...

    async def get_session(self, key: str) -> str | None: ...

    async def set_session(self, key: str, worker_id: str, ttl_s: float) -> None: ...

    async def cache_get(self, key: str) -> bytes | None: ...

    async def cache_set(self, key: str, value: bytes, ttl_s: float) -> None: ...


@runtime_checkable
class FleetBackend(Protocol):
    """A backend shared with other replicas by design (Redis), whether or not it answers now.

    Discovery and the fleet followers run only on one, and a worker's load report then counts
    other replicas' requests. Checked once at build time (`isinstance`), never per request."""

    @property
    def redis_url(self) -> str:
        """Where the shared state lives; followers open their own connections to it."""
        ...

    @property
    def cluster(self) -> bool:
        """Whether `redis_url` names a Redis Cluster."""
        ...

    @property
    def client(self) -> RedisClient | None:
        """The live connection, None while Redis is away."""
        ...
