"""Strict response framing: a scripted misbehaving worker (raw TCP) per case.

Each bad answer must give the client one clean OpenAI-shaped 502, the connection must be
discarded (the next request arrives on a new one), the gateway must not buffer without bound,
and the next request must be served.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest

from tests.conftest import GatewayFactory, chat_body, gateway_config
from tests.raw_server import CHAT_ANSWER as GOOD_BODY
from tests.raw_server import MODELS, raw_server, read_request

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
GOOD = OK + f"Content-Length: {len(GOOD_BODY)}\r\n\r\n".encode() + GOOD_BODY
HUGE = 8 << 20  # what a runaway worker would send if nobody stopped reading


def _chunked(*chunks: bytes, tail: bytes = b"0\r\n\r\n") -> bytes:
    body = b"".join(f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in chunks)
    return OK + b"Transfer-Encoding: chunked\r\n\r\n" + body + tail


@dataclass
class ScriptedWorker:
    """Answers health checks properly and each completion with the next scripted reply: bytes,
    or a callable that writes on the raw transport (for floods and resets)."""

    script: list[object] = field(default_factory=list)
    connections: list[int] = field(default_factory=list)
    """The connection number each completion arrived on."""
    flood_sent: int = 0
    _next_connection: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._next_connection += 1
        number = self._next_connection
        try:
            while True:
                path = await read_request(reader)
                if path != b"/v1/chat/completions":
                    body = MODELS if path == b"/v1/models" else b""
                    writer.write(OK + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                    await writer.drain()
                    continue
                self.connections.append(number)
                reply = self.script.pop(0) if self.script else GOOD
                if callable(reply):
                    await reply(self, writer)
                    return
                assert isinstance(reply, bytes)
                writer.write(reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def _flood(prefix: bytes, unit: bytes) -> object:
    async def write(worker: ScriptedWorker, writer: asyncio.StreamWriter) -> None:
        writer.write(prefix)
        while worker.flood_sent < HUGE:
            writer.write(unit * 1024)
            worker.flood_sent += len(unit) * 1024
            await writer.drain()

    return write


async def reader_closed(writer: asyncio.StreamWriter) -> None:
    """Wait until the test server closes the connection as it stops."""
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def _reset_mid_body(worker: ScriptedWorker, writer: asyncio.StreamWriter) -> None:
    writer.write(OK + b"\r\n" + GOOD_BODY[:10])  # close-delimited: no length, no chunking
    await writer.drain()
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()  # RST, not FIN: the body did not end


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[ScriptedWorker, str]]:
    worker = ScriptedWorker()
    async with raw_server(worker.handle) as url:
        yield worker, url


BAD_REPLIES: dict[str, object] = {
    "content-length twice, differing": OK + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\nab",
    "negative content-length": OK + b"Content-Length: -1\r\n\r\nab",
    "content-length with transfer-encoding": OK
    + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n",
    "transfer-encoding gzip": OK + b"Transfer-Encoding: gzip\r\n\r\nabc",
    "transfer-encoding chunked, gzip": OK + b"Transfer-Encoding: chunked, gzip\r\n\r\nabc",
    "chunk size with a sign": OK + b"Transfer-Encoding: chunked\r\n\r\n+2\r\nab\r\n0\r\n\r\n",
    "chunk size 0x": OK + b"Transfer-Encoding: chunked\r\n\r\n0x2\r\nab\r\n0\r\n\r\n",
    "chunk without its CRLF": OK + b"Transfer-Encoding: chunked\r\n\r\n2\r\nabXY0\r\n\r\n",
    "bare LF": b"HTTP/1.1 200 OK\nContent-Length: 2\n\nab",
    "folded header": OK + b"X: a\r\n b\r\nContent-Length: 2\r\n\r\nab",
    "150 headers": OK + b"".join(b"X-%d: y\r\n" % i for i in range(150)) + b"\r\n",
    "reset before a close-delimited body ended": _reset_mid_body,
}


@pytest.mark.parametrize("case", list(BAD_REPLIES))
async def test_a_malformed_answer_is_one_clean_502_and_the_next_request_is_served(
    case: str,
    scripted: tuple[ScriptedWorker, str],
    gateway: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    worker, url = scripted
    worker.script.append(BAD_REPLIES[case])
    config = gateway_config([url], load_scrape={"enabled": False}, health={"interval_s": 60})
    gateway_url = await gateway(config)
    chat = gateway_url + "/v1/chat/completions"
    async with http.post(chat, json=chat_body()) as resp:
        error = await resp.json()
    assert resp.status == 502, error
    assert error["error"]["type"] == "upstream_error"
    async with http.post(chat, json=chat_body()) as resp:
        assert resp.status == 200, await resp.text()
    first, second = worker.connections
    assert second != first  # the connection of the bad answer was discarded


@pytest.mark.parametrize(
    ("case", "prefix", "unit"),
    [
        ("endless head", OK, b"X-Pad: " + b"y" * 57 + b"\r\n"),
        ("endless chunk extension", OK + b"Transfer-Encoding: chunked\r\n\r\n2;x=", b"y" * 64),
        (
            "endless trailers",
            OK + b"Transfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n",
            b"X-T: " + b"y" * 57 + b"\r\n",
        ),
    ],
)
async def test_a_flood_of_framing_is_cut_off_not_buffered(
    case: str,
    prefix: bytes,
    unit: bytes,
    scripted: tuple[ScriptedWorker, str],
    gateway: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    worker, url = scripted
    worker.script.append(await _flood(prefix, unit))
    config = gateway_config([url], load_scrape={"enabled": False}, health={"interval_s": 60})
    gateway_url = await gateway(config)
    async with http.post(gateway_url + "/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 502, await resp.text()
    # The gateway closed the connection long before the worker could send all it wanted.
    assert worker.flood_sent < HUGE
    async with http.post(gateway_url + "/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 200


async def test_interim_1xx_heads_are_skipped(
    scripted: tuple[ScriptedWorker, str], gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    worker, url = scripted
    worker.script.append(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + GOOD
    )
    gateway_url = await gateway(gateway_config([url], load_scrape={"enabled": False}))
    async with http.post(gateway_url + "/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 200
        assert (await resp.json())["choices"][0]["message"]["content"] == "hi"


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(GOOD_BODY)}\r\n\r\n".encode()
        + GOOD_BODY,
        OK + b"Connection: keep-alive, Close\r\n" + GOOD[len(OK) :],
        GOOD + b"HTTP/1.1 200 OK\r\n",  # bytes after the answer: the connection is out of step
        _chunked(GOOD_BODY[:20], GOOD_BODY[20:]) + b"junk",
    ],
    ids=["HTTP/1.0", "close token", "bytes after the answer", "bytes after the last chunk"],
)
async def test_answers_that_end_reuse_are_served_on_a_connection_never_reused(
    reply: bytes,
    scripted: tuple[ScriptedWorker, str],
    gateway: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    worker, url = scripted
    worker.script.append(reply)
    config = gateway_config([url], load_scrape={"enabled": False}, health={"interval_s": 60})
    gateway_url = await gateway(config)
    for _ in range(2):
        async with http.post(gateway_url + "/v1/chat/completions", json=chat_body()) as resp:
            assert resp.status == 200, await resp.text()
    first, second = worker.connections
    assert second != first


async def test_a_stream_without_event_boundaries_is_cut_off_with_an_error_event(
    scripted: tuple[ScriptedWorker, str], gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    worker, url = scripted

    async def endless_event(worker: ScriptedWorker, writer: asyncio.StreamWriter) -> None:
        writer.write(OK + b"Transfer-Encoding: chunked\r\n\r\n")
        piece = b"data: " + b"y" * 65536
        while worker.flood_sent < HUGE:
            writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            worker.flood_sent += len(piece)
            await writer.drain()

    worker.script.append(endless_event)
    config = gateway_config([url], load_scrape={"enabled": False}, health={"interval_s": 60})
    gateway_url = await gateway(config)
    body = chat_body(stream=True)
    async with http.post(gateway_url + "/v1/chat/completions", json=body) as resp:
        raw = await resp.read()
    assert resp.status == 200  # the first bytes had come: the stream had begun
    assert raw.count(b"data: ") == 1 and b"event_too_large" in raw and b"[DONE]" not in raw
    assert worker.flood_sent < HUGE


async def test_a_connection_that_received_bytes_while_idle_is_not_reused(
    scripted: tuple[ScriptedWorker, str], gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    worker, url = scripted
    sent_stray = asyncio.Event()

    async def answer_then_stray(worker: ScriptedWorker, writer: asyncio.StreamWriter) -> None:
        writer.write(GOOD)
        await writer.drain()
        await asyncio.sleep(0.05)  # the gateway has read the answer and pooled the connection
        writer.write(b"HTTP/1.1 200 OK\r\n")  # ...then bytes nobody asked for
        await writer.drain()
        sent_stray.set()
        await reader_closed(writer)  # keep the connection open: only its bytes are wrong

    worker.script.append(answer_then_stray)
    config = gateway_config([url], load_scrape={"enabled": False}, health={"interval_s": 60})
    gateway_url = await gateway(config)
    async with http.post(gateway_url + "/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 200
    await sent_stray.wait()
    await asyncio.sleep(0.05)  # let the stray bytes reach the gateway's idle connection
    async with http.post(gateway_url + "/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 200, await resp.text()
    first, second = worker.connections
    assert second != first


async def test_a_client_slower_than_its_worker_holds_the_worker_back_not_gateway_memory(
    scripted: tuple[ScriptedWorker, str], gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    worker, url = scripted
    event = b'data: {"pad":"' + b"z" * 32000 + b'"}\n\n'
    total = 64 << 20  # far above what the kernel's socket buffers on the way can hold
    finished = asyncio.Event()

    async def long_stream(worker: ScriptedWorker, writer: asyncio.StreamWriter) -> None:
        writer.write(OK + b"Transfer-Encoding: chunked\r\n\r\n")
        while worker.flood_sent < total:
            writer.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
            worker.flood_sent += len(event)
            await writer.drain()
        done = b"data: [DONE]\n\n"
        writer.write(f"{len(done):x}\r\n".encode() + done + b"\r\n0\r\n\r\n")
        await writer.drain()
        finished.set()
        await reader_closed(writer)

    worker.script.append(long_stream)
    config = gateway_config([url], load_scrape={"enabled": False}, health={"interval_s": 60})
    gateway_url = await gateway(config)
    body = chat_body(stream=True)
    async with http.post(gateway_url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        first = await resp.content.readuntil(b"\n\n")
        # The client stops reading: the gateway must stop reading the worker too, not hold the
        # rest of the answer in its memory (the worker could then finish at loopback speed).
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(finished.wait(), 1.5)
        assert worker.flood_sent < total // 4
        rest = await resp.content.read()  # the client reads again: the stream resumes
    assert finished.is_set()
    assert (first + rest).count(b"data: ") == -(-total // len(event)) + 1
    assert (first + rest).endswith(b"data: [DONE]\n\n")
