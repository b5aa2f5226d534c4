"""A kept-alive connection the worker closed while it sat idle is not the worker's failure."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.conftest import MODEL, GatewayFactory, chat_body, gateway_config

ANSWER = json.dumps(
    {
        "id": "x",
        "object": "chat.completion",
        "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
).encode()
MODELS = json.dumps({"object": "list", "data": [{"id": MODEL}]}).encode()


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
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                path = head.split(b" ")[1]
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
    server = await asyncio.start_server(worker.handle, "127.0.0.1", 0)
    async with server:
        yield worker, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_request_on_a_connection_closed_while_idle_is_sent_again(
    worker_url: tuple[IdleClosingWorker, str],
    gateway: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    worker, url = worker_url
    config = gateway_config([url], load_scrape={"enabled": False}, health={"interval_s": 60})
    gateway_url = await gateway(config)
    for i in range(2):
        async with http.post(gateway_url + "/v1/chat/completions", json=chat_body(f"q{i}")) as r:
            assert r.status == 200, await r.text()
    # The second request met the closed connection, then went out again on a new one.
    assert worker.completions_seen == 3
    async with http.get(gateway_url + "/metrics") as resp:
        text = await resp.text()
    assert "prefix_router_upstream_failures_total{" not in text
