"""Eight worker processes under load, three killed at once: no request fails. Those that had
not started streaming are retried elsewhere; streams cut by the kill migrate to the workers left
(no error event, and never a silent truncation)."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import Iterator

import aiohttp
import pytest

from loadtest.procs import Fleet, Proc, start_sim, wait_ready
from tests.conftest import MODEL, GatewayFactory, chat_body, gateway_config, wait_for


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    procs = Fleet()
    yield procs
    procs.stop()


async def _one(http: aiohttp.ClientSession, url: str, i: int, outcomes: Counter[str]) -> None:
    body = chat_body(f"load {i} " * 20, stream=True, max_tokens=24)
    try:
        async with http.post(url + "/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                outcomes["failed_before_stream"] += 1
                return
            raw = await resp.read()
    except aiohttp.ClientError:
        outcomes["failed_before_stream"] += 1
        return
    tail = raw.rstrip().rsplit(b"\n", 1)[-1]
    if tail == b"data: [DONE]":
        outcomes["ok"] += 1
    elif b'"error"' in tail:
        outcomes["error_event"] += 1
    else:
        outcomes["silent_truncation"] += 1


async def test_three_of_eight_killed_under_load(
    fleet: Fleet, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    procs: list[Proc] = [start_sim(MODEL, ["--time-scale", "0.3"]) for _ in range(8)]
    fleet.procs.extend(procs)
    await asyncio.gather(*(wait_ready(p.url, "/health") for p in procs))
    url = await gateway(gateway_config([p.url for p in procs], health={"interval_s": 0.2}))
    outcomes: Counter[str] = Counter()
    stop = asyncio.Event()

    async def client(n: int) -> None:
        i = 0
        while not stop.is_set():
            await _one(http, url, n * 100_000 + i, outcomes)
            i += 1

    clients = [asyncio.create_task(client(n)) for n in range(12)]
    await wait_for(lambda: outcomes["ok"] >= 40, timeout_s=60, what="steady load")
    for proc in procs[:3]:
        proc.popen.send_signal(signal.SIGKILL)
    done_at_kill = sum(outcomes.values())
    await wait_for(
        lambda: sum(outcomes.values()) >= done_at_kill + 150,
        timeout_s=90,
        what="150 more requests after the kill",
    )
    stop.set()
    await asyncio.gather(*clients)
    assert outcomes["failed_before_stream"] == 0, outcomes
    assert outcomes["silent_truncation"] == 0, outcomes
    assert outcomes["error_event"] == 0, outcomes
    assert outcomes["ok"] >= 150, outcomes
