"""Concurrency limits with a real gateway, a simulated worker that holds requests on cue, and a
real Redis that goes away: slots are the gateway's own, and they come back where they were
taken."""

from __future__ import annotations

import asyncio

import aiohttp
import redis.asyncio as aioredis

from router.auth import Tenant, hash_key
from router.config import TenantLimits
from router.errors import RateLimited
from router.metrics import GatewayMetrics
from router.ratelimit import RateLimiter
from router.state.keys import Keys
from router.state.redis_state import RedisState
from tests.conftest import GatewayFactory, SimFactory, chat_body, gateway_config, wait_for
from tests.redis_server import RedisServer

KEY = "pr-limits-key-00000000000000"
TTL_S = 600.0


async def _admitted(http: aiohttp.ClientSession, sim_url: str) -> int:
    async with http.get(sim_url + "/sim/counters") as resp:
        return int((await resp.json())["requests"])


async def test_requests_sharing_a_client_request_id_each_take_a_slot(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    (sim,) = await sims(1)
    auth = {
        "enabled": True,
        "keys": [{"tenant": "t", "sha256": hash_key(KEY), "limits": {"concurrent_requests": 2}}],
    }
    url = await gateway(gateway_config([sim.url], auth=auth))
    async with http.post(sim.url + "/sim/faults", json={"kind": "hang_before_first_byte"}) as r:
        assert r.status == 200  # whatever is admitted stays in flight until the faults clear
    headers = {"Authorization": f"Bearer {KEY}", "X-Request-Id": "same-id-for-everyone"}

    async def send(i: int) -> int:
        body = chat_body(f"q{i}")
        async with http.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
            await resp.read()
            return resp.status

    tasks = [asyncio.create_task(send(i)) for i in range(50)]

    async def settled() -> bool:
        return sum(t.done() for t in tasks) + await _admitted(http, sim.url) >= 50

    try:
        await wait_for(settled, what="every request either refused or held by the worker")
        refused = [t.result() for t in tasks if t.done()]
        assert refused == [429] * 48, refused  # over the limit: refused at once, not queued
        assert await _admitted(http, sim.url) == 2
    finally:
        async with http.delete(sim.url + "/sim/faults") as r:
            assert r.status == 200
        statuses = await asyncio.gather(*tasks)
    assert statuses.count(200) == 2
    async with http.post(url + "/v1/chat/completions", json=chat_body(), headers=headers) as r:
        assert r.status == 200  # both slots came back


async def test_slots_are_released_on_the_backend_that_took_them(
    redis_server: RedisServer,
) -> None:
    state = RedisState(redis_server.url, timeout_s=0.05)
    await state.start()
    redis = aioredis.Redis.from_url(redis_server.url)
    key = "pr:limits:t:concurrency"
    try:
        assert state.shared
        assert await state.acquire_slot(key, 1, "in-redis", TTL_S)
        redis_server.pause()  # nothing answers, nothing is lost: a partition, not a restart
        try:
            # The first call meets the outage; the slot still held in Redis counts locally.
            assert not await state.acquire_slot(key, 1, "local-0", TTL_S)
            assert not state.shared
            # Taken in Redis, released while it is away: the release must reach it later.
            await state.release_slot(key, "in-redis")
            assert await state.acquire_slot(key, 1, "local", TTL_S)
            assert not await state.acquire_slot(key, 1, "local-2", TTL_S)
        finally:
            redis_server.resume()
        await wait_for(lambda: state.shared, what="redis is shared again")
        # Taken locally, released once Redis is back: it must be released here, not there.
        await state.release_slot(key, "local")

        async def redis_slot_freed() -> bool:
            return int(await redis.zcard(key)) == 0

        await wait_for(redis_slot_freed, what="the slot taken in redis released there")
        assert await state.acquire_slot(key, 1, "in-redis-2", TTL_S)
        await state.release_slot(key, "in-redis-2")
        redis_server.pause()
        try:
            # Redis away again: the local slot was given back, so the local limit is whole.
            assert await state.acquire_slot(key, 1, "local-3", TTL_S)
            assert not state.shared
        finally:
            redis_server.resume()
    finally:
        await redis.aclose()
        await state.close()


def _tenant(rpm: int) -> Tenant:
    return Tenant(
        name="t",
        models=frozenset({"*"}),
        priority="normal",
        admin=False,
        allow_routing_headers=False,
        limits=TenantLimits(requests_per_minute=rpm),
    )


async def _admitted_count(limiter: RateLimiter, tenant: Tenant, tries: int) -> int:
    admitted = 0
    for _ in range(tries):
        try:
            await limiter.admit(tenant, 1, TTL_S)
        except RateLimited:
            continue
        admitted += 1
    return admitted


async def test_a_redis_blip_does_not_hand_the_tenant_a_fresh_burst(
    redis_server: RedisServer,
) -> None:
    state = RedisState(redis_server.url, timeout_s=0.05)
    await state.start()
    limiter = RateLimiter(state, Keys("pr:"), GatewayMetrics(lambda: []), local_share=1.0)
    tenant = _tenant(rpm=5)
    try:
        assert await _admitted_count(limiter, tenant, 8) == 5  # the minute's budget, shared
        redis_server.pause()
        try:
            # Redis is away: the local twin goes on from the shared level, not a full bucket.
            assert await _admitted_count(limiter, tenant, 5) == 0
            assert not state.shared
        finally:
            redis_server.resume()
    finally:
        await state.close()


async def test_replicas_without_redis_admit_at_most_the_limit_in_total(
    redis_server: RedisServer,
) -> None:
    # Two replicas, each enforcing local_share = 1/2 of the tenant's limit while Redis is down.
    redis_server.pause()
    states = [RedisState(redis_server.url, timeout_s=0.05) for _ in range(2)]
    try:
        for state in states:
            await state.start()
        limiters = [
            RateLimiter(state, Keys("pr:"), GatewayMetrics(lambda: []), local_share=0.5)
            for state in states
        ]
        tenant = _tenant(rpm=10)
        admitted = [await _admitted_count(limiter, tenant, 20) for limiter in limiters]
        assert not any(state.shared for state in states)
        assert sum(admitted) <= 10 and admitted == [5, 5]
    finally:
        redis_server.resume()
        for state in states:
            await state.close()
