"""A worker whose agent publishes its load is not scraped by every gateway replica.

The worker here is a real aiohttp server that counts its /metrics requests; its "agent" is the
test writing the agent's records into a real Redis (the exact fields `prefix-worker agent`
writes, router/state/keys.py). While the records are fresh, the gateway takes the agent's load
and leaves the worker's /metrics alone; once they go stale (the agent died), it scrapes the
worker itself again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from router.http.context import STATE
from router.serve import start_gateway
from router.state.keys import Keys
from tests.conftest import MODEL, gateway_config, wait_for

KEYS = Keys()
AGENT = "gpu-x"
METRICS = f"""# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{model_name="{MODEL}"}} 0.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{model_name="{MODEL}"}} 0.0
"""


async def _health(_: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _models(_: web.Request) -> web.Response:
    return web.json_response({"data": [{"id": MODEL}]})


class CountingWorker:
    def __init__(self) -> None:
        self.scrapes = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", _health)
        app.router.add_get("/v1/models", _models)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def _metrics(self, _: web.Request) -> web.Response:
        self.scrapes += 1
        return web.Response(text=METRICS)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def worker() -> AsyncIterator[CountingWorker]:
    counting = CountingWorker()
    await counting.start()
    yield counting
    await counting.close()


async def test_agent_load_replaces_scraping_while_fresh(
    worker: CountingWorker, redis_url: str
) -> None:
    config = gateway_config(
        [worker.url],
        state={"backend": "redis", "redis_url": redis_url, "discovery_interval_s": 0.1},
    )
    runner, _ = await start_gateway(config)
    redis = aioredis.Redis.from_url(redis_url)
    beats = 0

    async def agent_heartbeats() -> None:
        nonlocal beats
        while True:
            pipe = redis.pipeline(transaction=False)
            pipe.hset(KEYS.worker(AGENT), mapping={"url": worker.url, "model": MODEL})
            pipe.hset(KEYS.load(AGENT), mapping={"running": "3", "ts": f"{time.time():.3f}"})
            pipe.sadd(KEYS.workers(MODEL), AGENT)
            await pipe.execute()
            beats += 1
            await asyncio.sleep(0.1)  # the simulated agent's heartbeat cadence

    heartbeats = asyncio.create_task(agent_heartbeats())
    try:
        (gateway_worker,) = runner.app[STATE].registry.pools[MODEL].workers
        await wait_for(
            lambda: gateway_worker.agent_id == AGENT and gateway_worker.reported.running == 3,
            what="the agent's load adopted",
        )
        scraped = worker.scrapes
        seen = beats
        # Many scrape intervals (0.2 s) pass: the agent's fresh load is used, /metrics untouched.
        await wait_for(lambda: beats >= seen + 15, what="the agent kept reporting")
        assert worker.scrapes <= scraped + 1  # at most one scrape already under way
        assert gateway_worker.reported.running == 3

        # The agent dies: its last report ages, and the gateway scrapes the worker itself.
        heartbeats.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await heartbeats
        await wait_for(lambda: worker.scrapes > scraped + 2, what="scraping resumed")
        await wait_for(lambda: gateway_worker.reported.running == 0, what="the scraped load")
    finally:
        heartbeats.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await heartbeats
        await redis.aclose()
        await runner.cleanup()
