"""The exchange of a request that aiohttp's server carries (every endpoint the front hands it).

The model handlers answer a `Reply`; `to_response` makes it the aiohttp response the handler
returns. A stream is written through aiohttp's own response object up to its first block (the
head and that block in one write); its later blocks go straight to the transport.
"""

from __future__ import annotations

from aiohttp import web

from router.http.body import read_body
from router.http.exchange import EVENT_STREAM, ClientStream, Exchange, Reply
from router.loop_metrics import LoopHistogramChild


class AiohttpExchange(Exchange):
    __slots__ = ("request", "response")

    def __init__(self, request: web.Request, request_id: str) -> None:
        super().__init__(request.path, request.headers, request_id)
        self.request = request
        self.response: web.StreamResponse | None = None

    async def read_body(self, max_bytes: int) -> bytes:
        return await read_body(self.request, max_bytes)

    async def open_stream(
        self, headers: dict[str, str], first: bytes, gaps: LoopHistogramChild
    ) -> ClientStream:
        response = web.StreamResponse(status=200, headers=headers)
        response.content_type = EVENT_STREAM
        response.headers["Cache-Control"] = "no-cache"
        writer = await response.prepare(self.request)
        transport = self.request.transport
        if writer is None or transport is None:
            raise ConnectionResetError("the client went away before the answer's head")
        self.response = response
        await response.write(first)  # aiohttp sends the head with it, in one write
        chunked = response.headers.get("Transfer-Encoding", "").lower() == "chunked"
        return ClientStream(transport, chunked, writer.drain, gaps)

    async def end_stream(self) -> None:
        assert self.response is not None, "a stream ends after its head"
        await self.response.write_eof()


EXCHANGE = web.RequestKey("exchange", AiohttpExchange)


def exchange_of(request: web.Request) -> AiohttpExchange:
    return request[EXCHANGE]


def to_response(exchange: AiohttpExchange, reply: Reply) -> web.StreamResponse:
    if reply.body is None:
        if exchange.response is None:  # its head could not be sent
            raise ConnectionResetError("the client went away before the answer's head")
        return exchange.response
    return web.Response(
        body=reply.body,
        status=reply.status,
        headers=reply.headers,
        content_type=reply.content_type,
    )
