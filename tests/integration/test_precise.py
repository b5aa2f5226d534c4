"""Precise prefix mode end to end: sims publishing KV events, agents, a real Redis, a gateway.

The gateway tokenizes and hashes each request as the simulated workers do (word tokenizer), and
its index learns what each worker holds from the agents' stream. Checks: a request sharing a
prefix goes to the worker that reported it, with the matched tokens the worker then reports as
cached; a late gateway rebuilds the view from snapshots; after the worker clears its cache the
gateway stops believing it (once its speculative entries expired); a Redis outage keeps the
view and a resync follows. Every wait is a condition with a deadline.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from router.config import GatewayConfig
from router.http.context import STATE
from router.routing.precise_index import PreciseIndex
from router.routing.precise_key import PreciseKeyer
from tests.conftest import MODEL, SimFactory, gateway_config, wait_for
from tests.integration.conftest import AppGateways, WorkerAgents
from tests.redis_server import RedisServer
from workers.sim.runner import SimHandle

TCP_ANY = "tcp://127.0.0.1:*"
KV_SIM = {"kv_events_endpoint": TCP_ANY, "kv_events_replay_endpoint": TCP_ANY}
SYSTEM = " ".join(f"policy{i}" for i in range(70))


def _config(yaml_urls: list[str], redis_url: str, ttl_s: float = 0.5) -> GatewayConfig:
    return gateway_config(
        yaml_urls,
        debug_headers=True,
        state={
            "backend": "redis",
            "redis_url": redis_url,
            "timeout_s": 0.2,
            "discovery_interval_s": 0.1,
        },
        pool={"precise": {"tokenizer": "word", "speculative_ttl_s": ttl_s}},
    )


GatewayStarter = AppGateways


@pytest.fixture
def precise_gateway(app_gateways: AppGateways) -> GatewayStarter:
    return app_gateways


@pytest.fixture
def agents(
    redis_url: str, worker_agents: WorkerAgents
) -> Callable[[SimHandle, str], Awaitable[None]]:
    return lambda sim, worker_id: worker_agents(sim, worker_id, redis_url)


def _index(app: web.Application) -> PreciseIndex:
    index = getattr(app[STATE].registry.pools[MODEL].policy, "precise", None)
    assert isinstance(index, PreciseIndex)
    return index


def _body(question: str, system: str = SYSTEM) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
        ],
        "max_tokens": 4,
    }


def _hashes(body: dict[str, Any]) -> list[int]:
    key = PreciseKeyer(_config([], "redis://unused").pools[MODEL].precise).key(body, chat=True)  # type: ignore[arg-type]
    assert key is not None
    return key.block_hashes


async def _ask(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with http.post(url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        data: dict[str, Any] = await resp.json()
        data["route"] = {
            "worker": resp.headers["X-Route-Worker"],
            "reason": resp.headers["X-Route-Reason"],
            "matched": int(resp.headers["X-Route-Matched-Tokens"]),
        }
        return data


def _confirmed(index: PreciseIndex, worker: str, hashes: list[int]) -> Callable[[], bool]:
    return lambda: set(hashes) <= index.confirmed_of(worker)


def _settled(index: PreciseIndex, *workers: str) -> Callable[[], bool]:
    return lambda: all(index.speculative_count(w) == 0 for w in workers)


async def test_routes_to_the_worker_that_reported_the_prefix(
    sims: SimFactory,
    agents: Callable[[SimHandle, str], Awaitable[None]],
    precise_gateway: GatewayStarter,
    http: aiohttp.ClientSession,
    redis_url: str,
) -> None:
    sim_a, sim_b = await sims(2, **KV_SIM)
    await agents(sim_a, "agent-a")  # beside the YAML worker: matched by URL
    await agents(sim_b, "gpu-b")  # registered only: discovered under its own id
    url, app = await precise_gateway(_config([sim_a.url], redis_url))
    index = _index(app)
    pool = app[STATE].registry.pools[MODEL]
    await wait_for(lambda: len(pool.workers) == 2, what="discovery")
    await wait_for(lambda: all(w.routable for w in pool.workers), what="both healthy")

    # Two distinct cold prompts land on distinct workers (the emptier worker wins ties).
    first = _body("what is the first rule", system=SYSTEM)
    other = _body("tell me more", system=SYSTEM.replace("policy", "rule"))
    cold = [await _ask(http, url, first), await _ask(http, url, other)]
    assert [c["route"]["matched"] for c in cold] == [0, 0]
    owner, other_owner = cold[0]["route"]["worker"], cold[1]["route"]["worker"]
    assert {owner, other_owner} == {"test-llm/0", "gpu-b"}
    await wait_for(_confirmed(index, owner, _hashes(first)), what="events confirm the blocks")
    await wait_for(_confirmed(index, other_owner, _hashes(other)), what="...on both workers")
    await wait_for(_settled(index, owner, other_owner), what="speculation expired")
    # The gateway counts the block events it applied, and their lag.
    async with http.get(url + "/metrics") as resp:
        metrics = await resp.text()
    applied = re.search(r'prefix_router_kv_events_applied_total\{pool="test-llm"\} (\S+)', metrics)
    assert applied is not None and float(applied.group(1)) >= len(_hashes(first))
    assert 'prefix_router_kv_event_lag_seconds_count{pool="test-llm"}' in metrics

    # Same system prompt, another question: routed on the reported blocks alone.
    follow = await _ask(http, url, _body("and the second rule"))
    assert follow["route"]["worker"] == owner and follow["route"]["reason"] == "prefix_hit"
    cached = follow["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0 and follow["route"]["matched"] == cached

    # A gateway that starts now rebuilds the same view from the agents' snapshots.
    _, late_app = await precise_gateway(_config([sim_a.url], redis_url))
    await wait_for(_confirmed(_index(late_app), owner, _hashes(first)), what="snapshot loaded")

    # The owner clears its cache (AllBlocksCleared): once speculation expired, nothing is held.
    owner_sim = sim_a if owner == "test-llm/0" else sim_b
    async with http.post(owner_sim.url + "/sim/reset") as resp:
        assert resp.status == 200
    await wait_for(lambda: not index.confirmed_of(owner), what="the clear reached the gateway")
    await wait_for(_settled(index, owner), what="speculation expired")
    assert index.match(_hashes(first)) == {}
    again = await _ask(http, url, _body("and the third rule"))
    assert again["route"]["matched"] == 0
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


async def test_redis_outage_keeps_the_view_then_resyncs(
    sims: SimFactory,
    agents: Callable[[SimHandle, str], Awaitable[None]],
    precise_gateway: GatewayStarter,
    http: aiohttp.ClientSession,
    redis_server: RedisServer,
) -> None:
    (sim,) = await sims(1, **KV_SIM)
    await agents(sim, "agent-a")
    url, app = await precise_gateway(_config([sim.url], redis_server.url))
    index = _index(app)
    await wait_for(lambda: app[STATE].registry.pools[MODEL].has_healthy_worker(), what="healthy")
    await wait_for(
        lambda: app[STATE].registry.pools[MODEL].workers[0].agent_id == "agent-a", what="agent"
    )
    body = _body("first question")
    await _ask(http, url, body)
    worker = "test-llm/0"
    await wait_for(_confirmed(index, worker, _hashes(body)), what="events confirm the blocks")

    await redis_server.astop()
    # While Redis is away the worker drops its cache; nobody can tell the gateway yet.
    async with http.post(sim.url + "/sim/reset") as resp:
        assert resp.status == 200
    await _ask(http, url, _body("asked during the outage", system="another prompt"))  # goes on
    assert set(_hashes(body)) <= index.confirmed_of(worker)  # the last view is kept

    await redis_server.astart()  # empty: the agent rewrites its (now empty) snapshot
    await wait_for(
        lambda: not set(_hashes(body)) & index.confirmed_of(worker),
        timeout_s=20.0,
        what="the resync after the outage forgot the cleared blocks",
    )
