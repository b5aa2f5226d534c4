"""Fleet state through a real Redis: discovery of registered workers, and Redis faults.

Registrations are written the way `prefix-worker agent` writes them (router/state/keys.py), so
these tests need no agent; tests/integration/test_agent.py covers the agent itself.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from router.auth import hash_key
from router.state.keys import Keys
from tests.conftest import MODEL, GatewayFactory, SimFactory, chat_body, gateway_config, wait_for
from tests.redis_server import RedisServer

KEY = "pr-redis-test-key-000000000"


def _state(url: str) -> dict[str, Any]:
    return {"backend": "redis", "redis_url": url, "timeout_s": 0.05, "discovery_interval_s": 0.2}


async def _ready(http: aiohttp.ClientSession, url: str) -> bool:
    async with http.get(url + "/ready") as resp:
        return resp.status == 200


async def _metric(http: aiohttp.ClientSession, url: str, name: str) -> float:
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(name))


async def test_registered_worker_is_discovered_and_lapsed_one_leaves(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession, redis_url: str
) -> None:
    (sim,) = await sims(1, time_scale=1.0)
    keys = Keys()
    redis = aioredis.Redis.from_url(redis_url)
    try:
        url = await gateway(gateway_config([], state=_state(redis_url)))
        assert not await _ready(http, url)  # no static worker, nobody registered yet
        await redis.hset(
            keys.worker("gpu-7"), mapping={"url": sim.url, "model": MODEL, "block_size": 16}
        )
        await redis.sadd(keys.workers(MODEL), "gpu-7")
        await wait_for(lambda: _ready(http, url), what="the registered worker is routable")
        long_request = asyncio.create_task(
            http.post(url + "/v1/chat/completions", json=chat_body("long", max_tokens=60))
        )
        await wait_for(
            lambda: _metric_is(http, url, "prefix_router_worker_in_flight{", 1),
            what="a request in flight on it",
        )
        await redis.delete(keys.worker("gpu-7"))  # its heartbeat lapsed
        await wait_for(lambda: _not(_ready(http, url)), what="the lapsed worker left the pool")
        response = await long_request  # ...but the request already on it finished
        assert response.status == 200
        assert (await response.json())["usage"]["completion_tokens"] == 60
    finally:
        await redis.aclose()


async def test_a_dead_agents_id_leaves_the_workers_set(
    gateway: GatewayFactory, redis_url: str
) -> None:
    keys = Keys()
    redis = aioredis.Redis.from_url(redis_url)
    try:
        await redis.sadd(keys.workers(MODEL), "died-long-ago")  # no registration any more
        await gateway(gateway_config([], state=_state(redis_url)))

        async def removed() -> bool:
            return not await redis.sismember(keys.workers(MODEL), "died-long-ago")

        await wait_for(removed, what="discovery removed the lapsed id")
    finally:
        await redis.aclose()


async def test_session_keys_use_the_pools_ttl_and_the_tenants_scope(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession, redis_url: str
) -> None:
    (sim,) = await sims(1)
    keys = Keys()
    redis = aioredis.Redis.from_url(redis_url)
    auth = {"enabled": True, "keys": [{"tenant": "team-a", "sha256": hash_key(KEY)}]}
    pool = {"policy": {"name": "hybrid", "session_ttl_s": 120}}
    try:
        url = await gateway(
            gateway_config([sim.url], state=_state(redis_url), auth=auth, pool=pool)
        )
        headers = {"Authorization": f"Bearer {KEY}", "X-Session-Id": "s1"}
        async with http.post(url + "/v1/chat/completions", json=chat_body(), headers=headers) as r:
            assert r.status == 200
        key = keys.session(MODEL, "team-a", "s1")

        async def written() -> bool:
            return bool(await redis.exists(key))

        await wait_for(written, what="the session written to Redis")
        assert 100 < await redis.ttl(key) <= 120
        assert not await redis.exists(f"pr:session:{MODEL}:s1")
    finally:
        await redis.aclose()


async def _metric_is(http: aiohttp.ClientSession, url: str, name: str, value: float) -> bool:
    return await _metric(http, url, name) == value


async def _not(value: Any) -> bool:
    return not await value


async def test_redis_outage_never_fails_a_request(
    sims: SimFactory,
    gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    workers = await sims(2)
    auth = {
        "enabled": True,
        "keys": [
            {"tenant": "t", "sha256": hash_key(KEY), "limits": {"requests_per_minute": 10_000}}
        ],
    }
    config = gateway_config([w.url for w in workers], state=_state(redis_server.url), auth=auth)
    url = await gateway(config)
    headers = {"Authorization": f"Bearer {KEY}", "X-Session-Id": "s1"}
    chat = url + "/v1/chat/completions"
    assert await _metric(http, url, "prefix_router_redis_up") == 1

    await redis_server.astop()
    for i in range(10):
        async with http.post(
            chat, json=chat_body(f"q{i}", stream=i % 2 == 0), headers=headers
        ) as resp:
            assert resp.status == 200
            await resp.read()
    assert await _metric(http, url, "prefix_router_redis_up") == 0
    warnings = [r for r in caplog.records if "redis unreachable" in r.getMessage()]
    assert len(warnings) == 1, "one warning per outage"

    await redis_server.astart()
    await wait_for(lambda: _metric_is(http, url, "prefix_router_redis_up", 1), what="resync")
    async with http.post(chat, json=chat_body(), headers=headers) as resp:
        assert resp.status == 200
    assert any("sharing state again" in r.getMessage() for r in caplog.records)


async def test_a_frozen_redis_does_not_hold_requests(
    sims: SimFactory,
    gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    redis_server: RedisServer,
) -> None:
    workers = await sims(1)
    auth = {
        "enabled": True,
        "keys": [
            {"tenant": "t", "sha256": hash_key(KEY), "limits": {"tokens_per_minute": 10_000_000}}
        ],
    }
    url = await gateway(
        gateway_config([w.url for w in workers], state=_state(redis_server.url), auth=auth)
    )
    redis_server.pause()  # connections stay open, nothing answers: the slowest possible Redis
    try:
        for i in range(3):
            async with http.post(
                url + "/v1/chat/completions",
                json=chat_body(f"f{i}"),
                headers={"Authorization": f"Bearer {KEY}"},
            ) as resp:
                assert resp.status == 200
        # Answered while Redis is still frozen: the per-call timeout, not Redis, bounded them.
        assert redis_server.running
    finally:
        redis_server.resume()


async def test_two_replicas_hold_one_shared_limit(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession, redis_url: str
) -> None:
    workers = await sims(2)
    limit = 300  # requests per minute, shared by both replicas
    auth = {
        "enabled": True,
        "keys": [
            {"tenant": "shared", "sha256": hash_key(KEY), "limits": {"requests_per_minute": limit}}
        ],
    }
    urls = [
        await gateway(gateway_config([w.url for w in workers], state=_state(redis_url), auth=auth))
        for _ in range(2)
    ]
    headers = {"Authorization": f"Bearer {KEY}"}
    loop = asyncio.get_running_loop()
    allowed = denied = 0
    started = loop.time()
    for i in range(2 * limit):
        body = chat_body(f"r{i}", max_tokens=1)
        async with http.post(
            urls[i % 2] + "/v1/chat/completions", json=body, headers=headers
        ) as resp:
            await resp.read()
            if resp.status == 200:
                allowed += 1
            else:
                assert resp.status == 429
                denied += 1
    elapsed_s = loop.time() - started
    # One bucket of `limit` shared by both, refilled at limit/60 per second while we sent.
    expected = limit + elapsed_s * limit / 60
    assert abs(allowed - expected) <= 0.05 * expected, (allowed, expected)
    assert denied > 0
