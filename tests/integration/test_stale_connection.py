"""Kept-alive connections and the worker's own keep-alive: what is resent, what is not.

A request is written again on a new connection only when nothing of it was written (the worker
had closed the connection while it sat idle). One the worker closed as the request went out may
have reached it, so it is not silently resent to the same worker: the dispatcher retries it on
another worker like any failed attempt, and it is counted.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.conftest import GatewayFactory, SimFactory, chat_body, gateway_config
from tests.raw_server import CHAT_ANSWER as ANSWER
from tests.raw_server import MODELS, raw_server, read_request


class IdleClosingWorker:
    """Answers the first completion on each connection, then closes the connection when the
    next one arrives on it, as a worker whose keep-alive timer fired at that moment would."""

    def __init__(self) -> None:
        self.completions_seen = 0
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = 0
        try:
            while True:
                path = await read_request(reader)
                if path == b"/v1/chat/completions":
                    self.completions_seen += 1
                    if served:
                        break  # close without answering
                    served += 1
                    body = ANSWER
                else:
                    body = MODELS if path == b"/v1/models" else b""
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def worker_url() -> AsyncIterator[tuple[IdleClosingWorker, str]]:
    worker = IdleClosingWorker()
    async with raw_server(worker.handle) as url:
        yield worker, url


async def test_a_request_the_worker_may_have_read_is_not_resent_to_it_but_retried_elsewhere(
    worker_url: tuple[IdleClosingWorker, str],
    sims: SimFactory,
    gateway: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    worker, url = worker_url
    (other,) = await sims(1)
    config = gateway_config(
        [url, other.url],
        load_scrape={"enabled": False},
        health={"interval_s": 60},
        pool={"policy": {"name": "round_robin"}},
    )
    gateway_url = await gateway(config)
    # Round robin: requests 1 and 3 go to the closing worker; 3 meets its reused connection.
    for i in range(3):
        async with http.post(gateway_url + "/v1/chat/completions", json=chat_body(f"q{i}")) as r:
            assert r.status == 200, await r.text()
    assert worker.completions_seen == 2  # the lost request was not written to it again
    async with http.get(gateway_url + "/metrics") as resp:
        text = await resp.text()
    assert 'prefix_router_upstream_failures_total{cause="stale_connection"} 1.0' in text
    assert 'prefix_router_retries_total{cause="stale_connection"} 1.0' in text
