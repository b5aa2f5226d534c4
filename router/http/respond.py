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
from typing import Any

from aiohttp import web

from router.domain.policy import Decision
from router.metrics import GatewayMetrics
from router.result_cache import render_body, render_stream
from router.upstream.call import UpstreamCall
from router.upstream.dispatch import Dispatcher
from router.upstream.migration import Migrator
from router.upstream.relay import Answer, StreamBroken
from router.upstream.sse import error_event

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
    await response.prepare(request)
    gaps = metrics.model(call.pool.name).inter_token
    last_write = 0.0
    first = answer
    scope = asyncio.timeout_at(deadline)
    try:
        async with scope:
            while True:
                try:
                    while (block := await answer.next_block()) is not None:
                        await response.write(block)
                        now = time.perf_counter()
                        if last_write:
                            gaps.observe(now - last_write)
                        else:
                            result.first_write_at = now
                        last_write = now
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
    dispatcher.stream_ended(answer)
    # A client that read [DONE] may hang up before the last chunk: nothing was lost.
    with contextlib.suppress(ConnectionError):
        await response.write_eof()
    return response


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
