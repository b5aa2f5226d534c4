"""Gateways and agents on a real three-master Redis Cluster (`state.cluster: true`).

The cluster is started by the test from the redis-server binary (tests/redis_cluster.py). Checks:
the fleet's state is in the cluster's keys, spread over the masters by hash tag; agents' KV
events reach a precise gateway through the sharded streams; a second replica follows the first
one's sessions; `prefix_router_redis_up` is 1; and a master SIGKILLed while requests flow fails
none of them (the gateway serves from local state until the cluster answers again).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from loadtest.procs import free_port
from router.auth import hash_key
from router.domain.pool import Pool
from router.http.context import STATE
from router.routing.precise_index import PreciseIndex
from router.state.keys import Keys
from tests.conftest import MODEL, SimFactory, chat_body, gateway_config, wait_for
from tests.integration.conftest import AppGateways, WorkerAgents
from tests.redis_cluster import RedisClusterNodes
from workers.sim.runner import SimHandle

TCP_ANY = "tcp://127.0.0.1:*"
KV_SIM = {"kv_events_endpoint": TCP_ANY, "kv_events_replay_endpoint": TCP_ANY}
KEY = "sk-cluster-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
KEYS = Keys()


def _state(url: str) -> dict[str, Any]:
    return {
        "backend": "redis",
        "redis_url": url,
        "cluster": True,
        "timeout_s": 0.2,
        "discovery_interval_s": 0.1,
    }


def _auth() -> dict[str, Any]:
    limits = {"requests_per_minute": 100_000, "concurrent_requests": 50}
    return {"enabled": True, "keys": [{"tenant": "t", "sha256": hash_key(KEY), "limits": limits}]}


@pytest.fixture
def cluster_agents(
    redis_cluster: RedisClusterNodes, worker_agents: WorkerAgents
) -> Callable[[SimHandle, str], Awaitable[None]]:
    return lambda sim, worker_id: worker_agents(sim, worker_id, redis_cluster.url, cluster=True)


async def _redis_up(http: aiohttp.ClientSession, url: str) -> float:
    async with http.get(url + "/metrics") as resp:
        found = re.search(r"^prefix_router_redis_up (\S+)$", await resp.text(), re.M)
    assert found is not None
    return float(found.group(1))


async def _ask(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str]
) -> str:
    """The worker that answered (debug headers on)."""
    async with http.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()
        return resp.headers["X-Route-Worker"]


async def test_agents_and_replicas_share_the_fleet_through_the_cluster(
    sims: SimFactory,
    cluster_agents: Callable[[SimHandle, str], Awaitable[None]],
    app_gateways: AppGateways,
    http: aiohttp.ClientSession,
    redis_cluster: RedisClusterNodes,
) -> None:
    sim_a, sim_b = await sims(2, **KV_SIM)
    # Two ids whose KV streams are different shards (so different hash tags).
    assert KEYS.kv_stream_of(MODEL, "gpu-a") != KEYS.kv_stream_of(MODEL, "gpu-b")
    await cluster_agents(sim_a, "gpu-a")
    await cluster_agents(sim_b, "gpu-b")
    config = gateway_config(
        [],
        debug_headers=True,
        auth=_auth(),
        state=_state(redis_cluster.url),
        pool={"workers": [], "precise": {"tokenizer": "word"}},
    )
    (a, app_a), (b, app_b) = [await app_gateways(config) for _ in range(2)]
    for app in (app_a, app_b):
        pool = app[STATE].registry.pools[MODEL]

        def fleet_ready(pool: Pool = pool) -> bool:
            return len(pool.workers) == 2 and all(w.routable for w in pool.workers)

        await wait_for(fleet_ready, what="both agents' workers discovered and healthy")
    assert await _redis_up(http, a) == 1.0 and await _redis_up(http, b) == 1.0

    # KV events travel agent -> sharded stream -> both gateways' precise indexes.
    body = chat_body(" ".join(f"word{i}" for i in range(80)), max_tokens=2)
    session = {**AUTH, "X-Session-Id": "conversation-1"}
    owner = await _ask(http, a, body, session)
    for app in (app_a, app_b):
        index = app[STATE].registry.pools[MODEL].policy.precise  # type: ignore[attr-defined]
        assert isinstance(index, PreciseIndex)

        def applied(index: PreciseIndex = index) -> bool:
            return bool(index.confirmed_of(owner))

        await wait_for(applied, what="KV events applied")

    # The second replica follows the first one's session (another prompt: no prefix pull).
    other = chat_body("an unrelated question about something else entirely", max_tokens=2)
    assert await _ask(http, b, other, session) == owner

    # The state is the cluster's: sessions, limits, registrations, streams and snapshots.
    found = await asyncio.to_thread(redis_cluster.keys, "pr:*")
    expected = {
        KEYS.session(MODEL, "t", "conversation-1"),
        KEYS.rate_limit("t", "rpm"),
        KEYS.worker("gpu-a"),
        KEYS.load("gpu-b"),
        KEYS.workers(MODEL),
        KEYS.kv_stream_of(MODEL, owner),
        KEYS.kv_snapshot(MODEL, owner),
    }
    assert expected <= found, expected - found
    masters = {redis_cluster.node_of(key).port for key in found}
    assert len(masters) >= 2, "every key landed on one master"


async def test_a_master_killed_while_requests_flow_fails_none_of_them(
    sims: SimFactory,
    app_gateways: AppGateways,
    http: aiohttp.ClientSession,
    redis_cluster: RedisClusterNodes,
) -> None:
    workers = await sims(2)
    config = gateway_config(
        [w.url for w in workers],
        debug_headers=True,
        auth=_auth(),
        state=_state(redis_cluster.url),
    )
    url, _app = await app_gateways(config)
    await wait_for(lambda: _is_up(http, url), what="redis_up 1")
    statuses: list[int] = []
    stop = asyncio.Event()

    async def traffic(lane: int) -> None:
        n = 0
        while not stop.is_set():
            body = chat_body(f"lane {lane} request {n}", max_tokens=2)
            headers = {**AUTH, "X-Session-Id": f"lane-{lane}-{n % 5}"}
            async with http.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
                await r.read()
                statuses.append(r.status)
            n += 1

    lanes = [asyncio.create_task(traffic(lane)) for lane in range(4)]
    try:
        await wait_for(lambda: len(statuses) >= 40, what="traffic flowing")
        victim = redis_cluster.node_of(KEYS.rate_limit("t", "rpm"))  # the limiter's master
        victim.kill()
        killed_at = len(statuses)
        await wait_for(lambda: _is_down(http, url), what="the gateway noticed the outage")
        await wait_for(lambda: len(statuses) >= killed_at + 100, what="traffic during outage")
        await victim.astart()
        await asyncio.to_thread(redis_cluster.wait_ok)
        await wait_for(lambda: _is_up(http, url), timeout_s=20.0, what="shared state again")
        back_at = len(statuses)
        await wait_for(lambda: len(statuses) >= back_at + 40, what="traffic after recovery")
    finally:
        stop.set()
        await asyncio.gather(*lanes)
    assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}


async def test_a_gateway_whose_cluster_is_unreachable_serves_from_local_state(
    sims: SimFactory, app_gateways: AppGateways, http: aiohttp.ClientSession
) -> None:
    (worker,) = await sims(1)
    nobody = f"redis://127.0.0.1:{free_port()}/0"  # no cluster node answers there
    config = gateway_config([worker.url], auth=_auth(), state=_state(nobody))
    url, _app = await app_gateways(config)
    assert await _is_down(http, url)
    async with http.post(url + "/v1/chat/completions", json=chat_body(), headers=AUTH) as resp:
        assert resp.status == 200, await resp.text()


async def _is_up(http: aiohttp.ClientSession, url: str) -> bool:
    return await _redis_up(http, url) == 1.0


async def _is_down(http: aiohttp.ClientSession, url: str) -> bool:
    return await _redis_up(http, url) == 0.0
