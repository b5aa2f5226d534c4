"""Request header values the upstream request cannot carry, against a real gateway and worker:
an X-Request-Id outside printable ASCII is replaced by a generated one, the request is served,
and no connection to the worker is left behind."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from tests.conftest import GatewayFactory, SimFactory, chat_body, gateway_config

ODD_IDS = [
    "請求-id-中文".encode(),  # not latin-1: cannot be written into the upstream request
    "id-é-latin1".encode("latin-1"),  # not UTF-8: arrives as an undecodable byte
    "emoji-🚀".encode(),
    b"id-\x80\xff-raw",
]


async def _raw_post(url: str, request_id: bytes) -> tuple[bytes, dict[str, str]]:
    """POST with the header's bytes exactly as given (clients differ in how they encode)."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(chat_body()).encode()
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n".encode()
            + b"X-Request-Id: "
            + request_id
            + b"\r\nConnection: close\r\n\r\n"
            + payload
        )
        async with asyncio.timeout(30):
            raw = await reader.read()
    finally:
        writer.close()
    head, _, _ = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return lines[0].encode("latin-1"), headers


@pytest.mark.parametrize("request_id", ODD_IDS, ids=["cjk", "latin1", "emoji", "raw"])
async def test_an_odd_request_id_is_replaced_and_leaks_no_connection(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession, request_id: bytes
) -> None:
    (sim,) = await sims(1)
    config = gateway_config([sim.url], health={"interval_s": 60}, load_scrape={"enabled": False})
    url = await gateway(config)
    async with http.post(url + "/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 200  # warm: the relay now keeps one connection to the worker
    server = sim.runner.server
    assert server is not None
    connections = len(server.connections)
    for _ in range(10):
        status, headers = await _raw_post(url, request_id)
        assert status.startswith(b"HTTP/1.1 200 "), status
        replacement = headers["x-request-id"]
        assert replacement.isascii() and replacement.isprintable()
        assert replacement.encode() != request_id
    # Every request went out on the kept-alive connection: none was left open and forgotten.
    assert len(server.connections) <= connections
