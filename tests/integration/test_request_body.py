"""A request body that reaches the gateway in pieces is read whole (real gateway, real sim)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp

from tests.conftest import MODEL, GatewayFactory, SimFactory, chat_body, gateway_config


async def test_a_body_sent_slowly_in_chunks_is_read_whole(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    (sim,) = await sims(1)
    url = await gateway(gateway_config([sim.url]))
    body = json.dumps(chat_body("word " * 20_000, max_tokens=2)).encode()
    pieces = [body[i : i + 8192] for i in range(0, len(body), 8192)]

    async def slowly() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece
            await asyncio.sleep(0)  # let the gateway see each piece on its own
            await asyncio.sleep(0.001)

    async with http.post(f"{url}/v1/chat/completions", data=slowly()) as resp:
        answer = await resp.json()
    assert resp.status == 200, answer
    assert answer["model"] == MODEL


async def test_a_chunked_body_over_the_limit_is_a_413_without_content_length(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    (sim,) = await sims(1)
    url = await gateway(gateway_config([sim.url], limits={"max_body_bytes": 50_000}))

    async def pieces() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b"x" * 8192
            await asyncio.sleep(0.001)

    async with http.post(f"{url}/v1/chat/completions", data=pieces()) as resp:
        answer = await resp.json()
    assert resp.status == 413
    assert answer["error"]["type"] == "invalid_request_error"
