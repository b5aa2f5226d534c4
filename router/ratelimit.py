"""Per-key rate limits: requests per minute, tokens per minute, concurrent requests.

Tokens are pre-charged at admission (prompt estimate + max_tokens) and reconciled with the
upstream's `usage` when the response ends. Buckets live in the state backend: one atomic Lua
script in Redis shared by every replica, or local memory, where each replica enforces its
configured share. Over a limit: 429 with `Retry-After` and OpenAI's `x-ratelimit-*` headers.
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field

from router.auth import Tenant
from router.errors import RateLimited
from router.metrics import GatewayMetrics
from router.state.backend import BucketResult, StateBackend
from router.state.keys import Keys


def _duration(seconds: float) -> str:
    """OpenAI's reset format: `1s`, `6m0s`, `250ms`."""
    if seconds < 1:
        return f"{max(1, int(seconds * 1000))}ms"
    minutes, secs = divmod(int(seconds + 0.999), 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


@dataclass
class Charge:
    """One admitted request's hold on its tenant's limits, settled exactly once."""

    limiter: RateLimiter | None
    tenant: Tenant
    holder: str
    charged_tokens: int = 0
    slot_key: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    settled: bool = False

    async def settle(self, actual_tokens: int | None) -> None:
        if self.settled or self.limiter is None:
            return
        self.settled = True
        await self.limiter.settle(self, actual_tokens)


class RateLimiter:
    def __init__(
        self, backend: StateBackend, keys: Keys, metrics: GatewayMetrics, local_share: float
    ) -> None:
        self._backend = backend
        self._keys = keys
        self._metrics = metrics
        self._local_share = local_share
        # Slot holders are the gateway's own ids, never the client's X-Request-Id: requests
        # sharing one would share a slot. The random prefix keeps replicas' ids apart in Redis.
        self._holder_prefix = uuid.uuid4().hex[:16]
        self._holder_seq = itertools.count(1)
        self.tenant_labels = False
        """Whether tenant names may appear as metric labels (`metrics.tenant_labels`)."""

    def _scale(self) -> float:
        return 1.0 if self._backend.shared else self._local_share

    async def admit(self, tenant: Tenant, tokens: int, ttl_s: float) -> Charge:
        limits = tenant.limits
        charge = Charge(self, tenant, "")
        if (
            limits.requests_per_minute is None
            and limits.tokens_per_minute is None
            and limits.concurrent_requests is None
        ):
            charge.limiter = None
            return charge
        scale = self._scale()
        taken_request = False
        try:
            if limits.requests_per_minute is not None:
                rpm = limits.requests_per_minute * scale
                result = await self._backend.take(
                    self._keys.rate_limit(tenant.name, "rpm"), rpm / 60, rpm, 1
                )
                self._headers(charge, "requests", limits.requests_per_minute, result)
                if not result.allowed:
                    self._deny(charge, "requests", result)
                taken_request = True
            if limits.tokens_per_minute is not None:
                tpm = limits.tokens_per_minute * scale
                cost = min(
                    tokens, tpm
                )  # a request larger than the whole bucket waits for a full one
                result = await self._backend.take(
                    self._keys.rate_limit(tenant.name, "tpm"), tpm / 60, tpm, cost
                )
                self._headers(charge, "tokens", limits.tokens_per_minute, result)
                if not result.allowed:
                    self._deny(charge, "tokens", result)
                charge.charged_tokens = int(cost)
            if limits.concurrent_requests is not None:
                key = self._keys.rate_limit(tenant.name, "concurrency")
                allowed = max(1, int(limits.concurrent_requests * scale))
                charge.holder = f"{self._holder_prefix}{next(self._holder_seq):x}"
                if not await self._backend.acquire_slot(key, allowed, charge.holder, ttl_s):
                    self._deny(charge, "concurrency", None)
                charge.slot_key = key
        except RateLimited:
            await self._undo(charge, taken_request)
            raise
        return charge

    def _headers(self, charge: Charge, kind: str, limit: int, result: BucketResult) -> None:
        charge.headers[f"x-ratelimit-limit-{kind}"] = str(limit)
        charge.headers[f"x-ratelimit-remaining-{kind}"] = str(int(result.remaining))
        charge.headers[f"x-ratelimit-reset-{kind}"] = _duration(result.reset_s)

    def _deny(self, charge: Charge, kind: str, result: BucketResult | None) -> None:
        label = charge.tenant.name if self.tenant_labels else "-"
        self._metrics.rate_limited.labels(label, kind).inc()
        retry = result.retry_after_s if result is not None else 1.0
        raise RateLimited(
            f"rate limit reached for {kind} of tenant {charge.tenant.name}; retry later",
            retry_after_s=max(retry, 0.001),
            headers=charge.headers,
        )

    async def _undo(self, charge: Charge, taken_request: bool) -> None:
        limits = charge.tenant.limits
        scale = self._scale()
        if taken_request and limits.requests_per_minute is not None:
            rpm = limits.requests_per_minute * scale
            await self._backend.give_back(
                self._keys.rate_limit(charge.tenant.name, "rpm"), rpm / 60, rpm, 1
            )
        if charge.charged_tokens and limits.tokens_per_minute is not None:
            tpm = limits.tokens_per_minute * scale
            await self._backend.give_back(
                self._keys.rate_limit(charge.tenant.name, "tpm"),
                tpm / 60,
                tpm,
                charge.charged_tokens,
            )
        charge.settled = True

    async def settle(self, charge: Charge, actual_tokens: int | None) -> None:
        limits = charge.tenant.limits
        if charge.slot_key is not None:
            await self._backend.release_slot(charge.slot_key, charge.holder)
        if actual_tokens is None or limits.tokens_per_minute is None or not charge.charged_tokens:
            return
        tpm = limits.tokens_per_minute * self._scale()
        key = self._keys.rate_limit(charge.tenant.name, "tpm")
        difference = charge.charged_tokens - actual_tokens
        if difference > 0:
            await self._backend.give_back(key, tpm / 60, tpm, difference)
        elif difference < 0:
            await self._backend.take(key, tpm / 60, tpm, -difference, force=True)
