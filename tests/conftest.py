"""Shared fixtures: real simulated workers and real gateways on ephemeral ports."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from router.config import GatewayConfig, parse_config
from router.serve import start_gateway
from workers.sim.config import SimConfig
from workers.sim.runner import SimHandle, start_sim_worker

MODEL = "test-llm"
# Fast timing so tests run quickly; tests never assert timings.
FAST_SIM: dict[str, Any] = {"time_scale": 0.0}


async def wait_for(
    condition: Callable[[], bool | Awaitable[bool]], timeout_s: float = 10.0, what: str = ""
) -> None:
    """Wait until `condition` holds, failing after a generous deadline (never a fixed sleep)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if not isinstance(value, bool):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s: {what}")
        await asyncio.sleep(0.01)


SimFactory = Callable[..., Awaitable[list[SimHandle]]]


@pytest.fixture
async def sims() -> AsyncIterator[SimFactory]:
    started: list[SimHandle] = []

    async def start(n: int = 2, **overrides: Any) -> list[SimHandle]:
        handles = []
        for _ in range(n):
            cfg = SimConfig(**{"model": MODEL, "port": 0, **FAST_SIM, **overrides})
            handle = await start_sim_worker(cfg)
            started.append(handle)
            handles.append(handle)
        return handles

    yield start
    for handle in started:
        await handle.stop()


def gateway_config(urls: list[str], **overrides: Any) -> GatewayConfig:
    pool: dict[str, Any] = {"workers": [{"url": u} for u in urls]}
    pool.update(overrides.pop("pool", {}))
    data: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "auth": {"enabled": False},
        "health": {"interval_s": 0.2, "timeout_s": 1.0},
        "load_scrape": {"interval_s": 0.2},
        "pools": {MODEL: pool},
    }
    data.update(overrides)
    return parse_config(data)


GatewayFactory = Callable[[GatewayConfig], Awaitable[str]]


@pytest.fixture
async def gateway() -> AsyncIterator[GatewayFactory]:
    runners = []

    async def start(config: GatewayConfig) -> str:
        runner, url = await start_gateway(config)
        runners.append(runner)
        return url

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def chat_body(
    content: str = "hello there", *, stream: bool = False, **extra: Any
) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
        "stream": stream,
        **extra,
    }


async def matched_and_cached(
    http: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> tuple[int, int]:
    """Send a non-streamed completion through a gateway with debug headers: (tokens the
    gateway predicted cached, tokens the worker reported cached)."""
    async with http.post(url + "/v1/completions", json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        predicted = int(resp.headers["X-Route-Matched-Tokens"])
        usage = (await resp.json())["usage"]
    return predicted, int(usage["prompt_tokens_details"]["cached_tokens"])
