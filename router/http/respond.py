"""The client's response: a relayed answer written as an aiohttp response.

A non-streamed answer becomes one `web.Response`. A stream's status line goes out only now
that the worker's first byte is in (everything before could still be retried); then the answer's
blocks are written as they come. Past the status line no HTTP error can reach the client, so a
stream that breaks, or outlives the request's total deadline, ends with one OpenAI error event
and no `[DONE]` (DESIGN §10).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from router.domain.policy import Decision
from router.metrics import GatewayMetrics, ModelSeries
from router.result_cache import render_body, render_stream
from router.upstream.call import CallResult, UpstreamCall
from router.upstream.dispatch import Dispatcher
from router.upstream.migration import Migrator
from router.upstream.sse import error_event
from router.upstream.stream import Answer, StreamBroken

_JSON = "application/json"


def body_response(answer: Answer) -> web.Response:
    response = web.Response(body=answer.body, status=200, content_type=_JSON)
    decorate(response, answer.call, answer.decision)
    return response


async def stream_response(
    request: web.Request,
    answer: Answer,
    dispatcher: Dispatcher,
    migrator: Migrator,
    metrics: GatewayMetrics,
    deadline: float,
) -> web.StreamResponse:
    """Write a streamed answer until its end, a break it cannot migrate past, or `deadline`
    (loop time). The first answer is the caller's to close; continuations are closed here."""
    call, result = answer.call, answer.result
    response = web.StreamResponse(status=200)
    response.content_type = "text/event-stream"
    response.headers["Cache-Control"] = "no-cache"
    decorate(response, call, answer.decision)
    writer = await response.prepare(request)
    transport = request.transport
    if writer is None or transport is None:
        raise ConnectionResetError("the client went away before the answer's head")
    sink = _ClientStream(transport, writer, response, metrics.model(call.pool.name))
    first = answer
    scope = asyncio.timeout_at(deadline)
    try:
        async with scope:
            while True:
                try:
                    if not result.first_write_at:
                        # aiohttp writes the head with the first block, in one write.
                        block = await answer.next_block()
                        if block is None:
                            break
                        await response.write(block)
                        sink.first_written(result)
                    await answer.pump(sink)
                    break
                except StreamBroken as exc:
                    # The worker broke: book it, then let another one continue the answer.
                    dispatcher.stream_broke(answer, exc.cause)
                    continued = await migrator.resume(answer, exc.cause, deadline)
                    if continued is None:
                        await _end_broken(response, answer, metrics, exc.cause)
                        return response
                    answer.close()  # idempotent: the broken worker's count ends now
                    answer = continued
    except TimeoutError:
        if not scope.expired():
            raise
        dispatcher.stream_overdue(answer)
        metrics.stream_errors.labels(call.pool.name).inc()
        await _end_with_error(response, "the request ran past its total deadline", "timeout")
        return response
    finally:
        if answer is not first:
            answer.close()
    # The client's answer ends first, then the books (policy, index, learned rates): the
    # client's last byte does not wait for them. A client that read [DONE] may hang up before
    # the last chunk: nothing was lost.
    try:
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
    finally:
        dispatcher.stream_ended(answer)
    return response


class _ClientStream:
    """The client's side of a pumped stream: each block written to its transport at once, as
    an HTTP/1.1 chunk (aiohttp's writer sent the head and the first block, and its `write_eof`
    sends the last chunk); an HTTP/1.0 client's body is not chunked but ends with the
    connection. Each write also times the gap since the last one."""

    __slots__ = ("_chunked", "_gaps", "_high", "_last", "_transport", "_writer")

    def __init__(
        self,
        transport: asyncio.BaseTransport,
        writer: AbstractStreamWriter,
        response: web.StreamResponse,
        metrics: ModelSeries,
    ) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._writer = writer
        self._chunked = response.headers.get("Transfer-Encoding", "").lower() == "chunked"
        self._gaps = metrics.inter_token
        self._high = self._transport.get_write_buffer_limits()[1]
        self._last = 0.0

    def first_written(self, result: CallResult) -> None:
        self._last = result.first_write_at = time.perf_counter()

    def write(self, block: bytes) -> None:
        transport = self._transport
        if transport.is_closing():
            raise ConnectionResetError("the client went away")
        transport.write(b"%x\r\n%b\r\n" % (len(block), block) if self._chunked else block)
        now = time.perf_counter()
        self._gaps.observe(now - self._last)
        self._last = now

    def full(self) -> bool:
        return self._transport.get_write_buffer_size() > self._high

    async def drain(self) -> None:
        await self._writer.drain()


async def _end_broken(
    response: web.StreamResponse, answer: Answer, metrics: GatewayMetrics, cause: str
) -> None:
    answer.result.stream_broken = True
    metrics.stream_errors.labels(answer.call.pool.name).inc()
    await _end_with_error(
        response,
        f"the worker serving this request failed mid-stream ({cause})",
        "upstream_stream_broken",
    )


async def _end_with_error(response: web.StreamResponse, message: str, code: str) -> None:
    with contextlib.suppress(ConnectionError):
        await response.write(error_event(message, "upstream_error", code))
        await response.write_eof()


def decorate(response: web.StreamResponse, call: UpstreamCall, decision: Decision) -> None:
    response.headers["X-Request-Id"] = call.request_id
    if call.extra_headers:
        response.headers.update(call.extra_headers)
    if call.debug_headers:
        response.headers["X-Route-Worker"] = decision.worker.id
        response.headers["X-Route-Reason"] = decision.reason
        response.headers["X-Route-Matched-Tokens"] = str(decision.matched_tokens)


async def respond_from_cache(
    request: web.Request,
    kind: str,
    model: str,
    entry: dict[str, Any],
    stream: bool,
    with_usage: bool,
    headers: dict[str, str],
    transform: Callable[[bytes], bytes] | None = None,
) -> web.StreamResponse:
    headers = {**headers, "X-Cache": "hit"}
    if not stream:
        return web.json_response(render_body(kind, model, entry), headers=headers)
    response = web.StreamResponse(status=200, headers=headers)
    response.content_type = "text/event-stream"
    await response.prepare(request)
    events = render_stream(kind, model, entry, with_usage)
    await response.write(transform(events) if transform is not None else events)
    await response.write_eof()
    return response
