"""The gateway's HTTP/1.1 front, over raw sockets: what it serves itself, what it hands to aiohttp
with the connection, and how it refuses what it cannot take."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import httptools
import pytest
import yarl
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MODEL, GatewayFactory, SimFactory, gateway_config, wait_for
from tests.integration.conftest import AccessLines


@dataclass
class Response:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    complete: bool = False


class _Reader:
    """Reads responses off one connection with httptools' response parser."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self._done: list[Response] = []
        self._current = Response()
        self._name = b""
        self._parser = httptools.HttpResponseParser(self)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._current.headers[name.decode().lower()] = value.decode()

    def on_headers_complete(self) -> None:
        self._current.status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._current.body += body

    def on_message_complete(self) -> None:
        self._current.complete = True
        if self._current.status != 100:
            self._done.append(self._current)
        self._current = Response()

    async def response(self) -> Response:
        while not self._done:
            data = await asyncio.wait_for(self._reader.read(65536), 10)
            if not data:
                raise ConnectionResetError("closed before a whole response")
            self._parser.feed_data(data)
        return self._done.pop(0)

    async def closed(self) -> bool:
        return await asyncio.wait_for(self._reader.read(1), 10) == b""


@pytest.fixture
async def url(sims: SimFactory, gateway: GatewayFactory) -> str:
    workers = await sims(1)
    return await gateway(gateway_config([w.url for w in workers]))


@pytest.fixture
async def conn(url: str) -> AsyncIterator[tuple[_Reader, asyncio.StreamWriter]]:
    async with connected(url) as opened:
        yield opened


@contextlib.asynccontextmanager
async def connected(url: str) -> AsyncIterator[tuple[_Reader, asyncio.StreamWriter]]:
    """One raw connection to the gateway at `url`, closed afterwards."""
    address = yarl.URL(url)
    assert address.host is not None and address.port is not None
    reader, writer = await asyncio.open_connection(address.host, address.port)
    try:
        yield _Reader(reader), writer
    finally:
        writer.close()
        await writer.wait_closed()


def completion(stream: bool = False, **headers: str) -> bytes:
    body = json.dumps({"model": MODEL, "prompt": "a b c", "max_tokens": 3, "stream": stream})
    return post("/v1/completions", body.encode(), **headers)


def post(path: str, body: bytes, **headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: gw", f"Content-Length: {len(body)}"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return "\r\n".join([*lines, "", ""]).encode() + body


GET_HEALTH = b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n"


async def test_a_kept_alive_connection_mixes_served_and_handed_over_requests(
    conn: tuple[_Reader, asyncio.StreamWriter],
) -> None:
    reader, writer = conn
    writer.write(completion())
    first = await reader.response()
    assert first.status == 200 and json.loads(first.body)["choices"]
    writer.write(GET_HEALTH)  # aiohttp's from here on, on the same connection
    health = await reader.response()
    assert health.status == 200
    writer.write(completion(stream=True))
    streamed = await reader.response()
    assert streamed.status == 200 and streamed.body.endswith(b"data: [DONE]\n\n")


async def test_pipelined_model_requests_are_answered_in_order(
    conn: tuple[_Reader, asyncio.StreamWriter],
) -> None:
    reader, writer = conn
    writer.write(completion(stream=True, X_Request_Id="one") + completion(X_Request_Id="two"))
    first, second = await reader.response(), await reader.response()
    assert (first.headers["x-request-id"], second.headers["x-request-id"]) == ("one", "two")
    assert first.body.endswith(b"data: [DONE]\n\n") and json.loads(second.body)["usage"]


async def test_another_path_pipelined_behind_a_model_request_is_refused_not_misread(
    conn: tuple[_Reader, asyncio.StreamWriter],
) -> None:
    reader, writer = conn
    writer.write(completion() + GET_HEALTH)
    assert (await reader.response()).status == 200
    refused = await reader.response()
    assert refused.status == 400
    assert json.loads(refused.body)["error"]["type"] == "invalid_request_error"
    assert await reader.closed()


async def test_a_body_over_the_limit_is_refused_before_it_is_read(
    sims: SimFactory, gateway: GatewayFactory
) -> None:
    workers = await sims(1)
    url = await gateway(gateway_config([w.url for w in workers], limits={"max_body_bytes": 2000}))
    async with connected(url) as (reader, writer):
        head = post("/v1/completions", b"", Expect="100-continue")
        writer.write(head.replace(b"Content-Length: 0", b"Content-Length: 5000"))
        refused = await reader.response()  # no 100 Continue: the body is never sent
        assert refused.status == 413
        assert json.loads(refused.body)["error"]["type"] == "invalid_request_error"
        assert await reader.closed()


async def test_refusals_are_counted_and_logged_like_any_request(
    sims: SimFactory,
    gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    access_lines: AccessLines,
) -> None:
    workers = await sims(1)
    url = await gateway(gateway_config([w.url for w in workers], limits={"max_body_bytes": 2000}))
    too_big = post("/v1/completions", b"", X_Request_Id="big").replace(
        b"Content-Length: 0", b"Content-Length: 5000"
    )
    for request in (too_big, b"POST /v1/completions HTTP/1.1\r\nContent-Length: x\r\n\r\n"):
        async with connected(url) as (reader, writer):
            writer.write(request)
            assert (await reader.response()).status in (400, 413)

    await wait_for(lambda: len(access_lines()) == 2, what="both refusals logged")
    big, malformed = access_lines()
    assert (big["status"], big["path"], big["request_id"]) == (413, "/v1/completions", "big")
    assert malformed["status"] == 400 and malformed["request_id"]
    async with http.get(url + "/metrics") as r:
        text = await r.text()
    counted = {
        sample.labels["status"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "prefix_router_requests_total"
    }
    assert counted == {"413": 1.0, "400": 1.0}


async def test_expect_continue_gets_its_interim_answer_then_the_response(
    conn: tuple[_Reader, asyncio.StreamWriter],
) -> None:
    reader, writer = conn
    request = completion(Expect="100-continue")
    head, _, body = request.partition(b"\r\n\r\n")
    writer.write(head + b"\r\n\r\n")
    interim = await asyncio.wait_for(reader._reader.readuntil(b"\r\n\r\n"), 10)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(body)
    assert (await reader.response()).status == 200


async def test_a_chunked_request_body_is_read_whole(
    conn: tuple[_Reader, asyncio.StreamWriter],
) -> None:
    reader, writer = conn
    body = json.dumps({"model": MODEL, "prompt": "a b", "max_tokens": 2}).encode()
    half = len(body) // 2
    chunks = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in (body[:half], body[half:]))
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunks
        + b"0\r\n\r\n"
    )
    answer = await reader.response()
    assert answer.status == 200 and json.loads(answer.body)["usage"]["prompt_tokens"] > 0


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"POST /v1/completions HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400),
        (b"POST /v1/completions HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    ],
    ids=["malformed", "head too large"],
)
async def test_an_unreadable_request_gets_an_openai_error_and_the_connection_closes(
    conn: tuple[_Reader, asyncio.StreamWriter], request_bytes: bytes, status: int
) -> None:
    reader, writer = conn
    writer.write(request_bytes)
    refused = await reader.response()
    assert refused.status == status
    assert json.loads(refused.body)["error"]["message"]
    assert await reader.closed()


async def test_an_http10_client_is_answered_and_the_connection_ends(
    conn: tuple[_Reader, asyncio.StreamWriter],
) -> None:
    reader, writer = conn
    writer.write(completion().replace(b"HTTP/1.1", b"HTTP/1.0", 1))
    answer = await reader.response()
    assert answer.status == 200 and json.loads(answer.body)["choices"]
    assert await reader.closed()


async def test_the_response_head_carries_the_request_id_and_closes_when_asked(
    conn: tuple[_Reader, asyncio.StreamWriter],
) -> None:
    reader, writer = conn
    writer.write(completion(X_Request_Id="abc-1", Connection="close"))
    answer = await reader.response()
    assert answer.headers["x-request-id"] == "abc-1"
    assert answer.headers["connection"] == "close"
    assert answer.headers["content-length"] == str(len(answer.body))
    assert await reader.closed()


async def test_a_wrong_method_on_a_model_path_gets_aiohttps_405(
    conn: tuple[_Reader, asyncio.StreamWriter],
) -> None:
    reader, writer = conn
    writer.write(b"GET /v1/completions HTTP/1.1\r\nHost: gw\r\n\r\n")
    answer = await reader.response()
    assert answer.status == 405 and "POST" in answer.headers["allow"]


async def test_connections_are_dropped_on_stop(sims: SimFactory) -> None:
    from router.serve import start_gateway

    workers = await sims(1)
    runner, url = await start_gateway(gateway_config([w.url for w in workers]))
    async with connected(url) as (reader, writer):
        writer.write(completion())
        assert (await reader.response()).status == 200
        await runner.cleanup()  # the idle kept-alive connection closes with the gateway
        assert await reader.closed()


@pytest.mark.parametrize(
    "sent", [b"", b"POST /v1/completions HTTP/1.1\r\nHost:"], ids=["silent", "half a head"]
)
async def test_a_connection_idle_past_its_keepalive_is_closed(sent: bytes) -> None:
    from router.http.front.exchange import Written
    from router.http.front.protocol import Front

    async def never_served(*_: object) -> Written:
        raise AssertionError("no whole request was sent")

    front = Front(never_served, asyncio.Protocol, max_body_bytes=1024, keepalive_s=0.2)
    server = await asyncio.get_running_loop().create_server(front, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(sent)
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the front
        writer.close()
        await writer.wait_closed()
        assert not front.connections
    finally:
        server.close()
        await server.wait_closed()


async def test_a_compressed_body_is_inflated_by_aiohttp(
    conn: tuple[_Reader, asyncio.StreamWriter],
) -> None:
    import gzip

    reader, writer = conn
    body = gzip.compress(json.dumps({"model": MODEL, "prompt": "a b", "max_tokens": 2}).encode())
    writer.write(post("/v1/completions", body, Content_Encoding="gzip"))
    answer = await reader.response()
    assert answer.status == 200 and json.loads(answer.body)["usage"]["prompt_tokens"] > 0


def test_nothing_follows_the_last_chunk_of_a_stream() -> None:
    """The block carrying [DONE] goes out with the body's last chunk; whatever the relay writes
    after it (an error event after a late break) must not reach the client. A recording
    transport stands in for the socket: the framing is the point here."""
    from router.http.exchange import LAST_CHUNK, ClientStream
    from router.loop_metrics import LoopHistogramChild

    class Transport(asyncio.Transport):
        def __init__(self) -> None:
            super().__init__()
            self.sent: list[bytes] = []

        def write(self, data: bytes | bytearray | memoryview) -> None:
            self.sent.append(bytes(data))

        def is_closing(self) -> bool:
            return False

        def get_write_buffer_limits(self) -> tuple[int, int]:
            return (0, 65536)

    async def drain() -> None:
        return None

    ended: list[bool] = []
    transport = Transport()
    stream = ClientStream(
        transport, True, drain, LoopHistogramChild((1.0,)), ends_at_done=True,
        on_last=lambda: ended.append(True),
    )  # fmt: skip
    stream.write(b'data: {"x": 1}\n\ndata: [DONE]\n\n')
    stream.write(b'data: {"error": "late"}\n\n')
    assert stream.ended and ended == [True]
    assert len(transport.sent) == 1 and transport.sent[0].endswith(LAST_CHUNK)
