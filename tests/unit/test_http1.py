"""The lean upstream HTTP/1.1 client against a raw socket server that sends crafted bytes,
split at every awkward boundary."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from router.upstream.http1 import UpstreamProtocolError, format_request
from router.upstream.upstream_pool import UpstreamClient
from tests.raw_server import raw_server


def _serve(
    pieces: list[bytes], close_after: bool = False
) -> contextlib.AbstractAsyncContextManager[str]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0)  # let each piece arrive on its own
        if close_after:
            writer.close()
        else:
            await reader.read()  # keep the connection until the client closes it

    return raw_server(handle)


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    upstream = UpstreamClient()
    yield upstream
    upstream.close()


async def _fetch(client: UpstreamClient, url: str) -> tuple[int, bytes, bool]:
    conn = await client.connect(url, 5)
    conn.send(format_request("/x", url.split("://")[1], b"{}", {}))
    loop = asyncio.get_running_loop()
    head = await conn.read_head(loop.time() + 5)
    parts = []
    while chunk := await conn.read(loop.time() + 5):
        parts.append(chunk)
    return head.status, b"".join(parts), conn.reusable


def _bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n"
    b"7\r\ndata: a\r\n"
    b"A;ext=1\r\n\n\ndata: bc\r\n"
    b"0\r\nX-Trailer: y\r\n\r\n"
)


async def test_chunked_body_split_byte_by_byte(client: UpstreamClient) -> None:
    async with _serve(_bytewise(CHUNKED)) as url:
        status, body, reusable = await _fetch(client, url)
    assert status == 200
    assert body == b"data: a\n\ndata: bc"
    assert reusable


async def test_content_length_and_keep_alive_reuse(client: UpstreamClient) -> None:
    response = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 5\r\n\r\nbusy!"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):  # two requests on one connection
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(2)
            writer.write(response)
            await writer.drain()
        await reader.read()

    async with raw_server(handle) as url:
        conn = await client.connect(url, 5)
        for _ in range(2):
            conn.send(format_request("/x", "h", b"{}", {}))
            loop = asyncio.get_running_loop()
            head = await conn.read_head(loop.time() + 5)
            assert head.status == 503
            assert await conn.read(loop.time() + 5) == b"busy!"
            assert await conn.read(loop.time() + 5) == b""
            client.release(url, conn)
            again = await client.connect(url, 5)
            assert again is conn  # kept alive and reused


async def test_an_idle_connection_past_keepalive_is_closed_not_reused(
    client: UpstreamClient,
) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(2)
            except asyncio.IncompleteReadError:
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async with raw_server(handle) as url:
        loop = asyncio.get_running_loop()
        conn = await client.connect(url, 5)
        assert conn.send(format_request("/x", "h", b"{}", {}))
        await conn.read_head(loop.time() + 5)
        while await conn.read(loop.time() + 5):
            pass
        client.release(url, conn)
        conn.idle_since -= client.keepalive_s + 1  # it sat idle longer than keepalive_s
        again = await client.connect(url, 5)
        assert again is not conn
        assert conn.transport is None or conn.transport.is_closing()
        again.close()


async def test_body_until_close(client: UpstreamClient) -> None:
    async with _serve([b"HTTP/1.1 200 OK\r\n\r\nall ", b"of it"], close_after=True) as url:
        status, body, reusable = await _fetch(client, url)
    assert (status, body, reusable) == (200, b"all of it", False)


async def test_connection_lost_mid_chunk_is_an_error(client: UpstreamClient) -> None:
    cut = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nonly half"
    async with _serve([cut], close_after=True) as url:
        with pytest.raises(ConnectionError):
            await _fetch(client, url)


async def test_garbage_is_a_protocol_error(client: UpstreamClient) -> None:
    async with _serve([b"SSH-2.0-OpenSSH\r\n\r\n"]) as url:
        with pytest.raises(UpstreamProtocolError):
            await _fetch(client, url)


async def test_a_silent_worker_times_out(client: UpstreamClient) -> None:
    async with _serve([]) as url:
        conn = await client.connect(url, 5)
        conn.send(format_request("/x", "h", b"{}", {}))
        with pytest.raises(TimeoutError):
            await conn.read_head(asyncio.get_running_loop().time() + 0.05)
        conn.close()
