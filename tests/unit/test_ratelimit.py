"""Rate limits against the memory backend: buckets, pre-charge and reconcile, concurrency."""

from __future__ import annotations

import pytest

from router.auth import Tenant
from router.config import TenantLimits
from router.errors import RateLimited
from router.metrics import GatewayMetrics
from router.ratelimit import RateLimiter
from router.state.keys import Keys
from router.state.memory import MemoryState


def _tenant(**limits: int) -> Tenant:
    return Tenant("t", frozenset({"*"}), "normal", False, False, TenantLimits(**limits))


def _limiter(share: float = 1.0) -> RateLimiter:
    return RateLimiter(MemoryState(), Keys(), GatewayMetrics(lambda: []), share)


async def test_requests_per_minute_then_429_with_headers() -> None:
    limiter = _limiter()
    tenant = _tenant(requests_per_minute=3)
    for _ in range(3):
        charge = await limiter.admit(tenant, 10, 60)
        assert charge.headers["x-ratelimit-limit-requests"] == "3"
    with pytest.raises(RateLimited) as denied:
        await limiter.admit(tenant, 10, 60)
    headers = denied.value.headers()
    assert int(headers["Retry-After"]) >= 1
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert "x-ratelimit-reset-requests" in headers


async def test_tokens_are_precharged_and_reconciled() -> None:
    limiter = _limiter()
    tenant = _tenant(tokens_per_minute=1000)
    first = await limiter.admit(tenant, 900, 60)
    with pytest.raises(RateLimited):
        await limiter.admit(tenant, 500, 60)
    await first.settle(100)  # it used far fewer tokens than it reserved
    second = await limiter.admit(tenant, 500, 60)
    assert second.charged_tokens == 500


async def test_a_denied_token_charge_gives_back_the_request() -> None:
    limiter = _limiter()
    tenant = _tenant(requests_per_minute=2, tokens_per_minute=100)
    await limiter.admit(tenant, 100, 60)
    with pytest.raises(RateLimited):
        await limiter.admit(tenant, 100, 60)  # tokens deny; its request is refunded
    await limiter.admit(tenant, 0, 60)  # so the second request slot is still there


async def test_concurrency_slots_are_released() -> None:
    limiter = _limiter()
    tenant = _tenant(concurrent_requests=1)
    held = await limiter.admit(tenant, 1, 60)
    with pytest.raises(RateLimited):
        await limiter.admit(tenant, 1, 60)
    await held.settle(None)
    await limiter.admit(tenant, 1, 60)


async def test_local_share_scales_limits_without_shared_state() -> None:
    limiter = _limiter(share=0.5)
    tenant = _tenant(requests_per_minute=4)
    await limiter.admit(tenant, 1, 60)
    await limiter.admit(tenant, 1, 60)
    with pytest.raises(RateLimited):
        await limiter.admit(tenant, 1, 60)


async def test_unlimited_tenant_costs_nothing() -> None:
    limiter = _limiter()
    charge = await limiter.admit(_tenant(), 10**9, 60)
    assert charge.headers == {}
    await charge.settle(5)
