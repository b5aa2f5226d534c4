"""The client's response: a relayed answer as a `Reply`, or a stream written to the exchange.

A non-streamed answer is one body. A stream's head goes out only now that the worker's first
block is in (everything before could still be retried), in one write with that block; the rest
is pumped straight to the client's transport. Past the head no HTTP error can reach the client,
so a stream that breaks, or outlives the request's total deadline, ends with one OpenAI error
event and no `[DONE]` (DESIGN §10).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

from router.domain.policy import Decision
from router.http.exchange import ClientStream, Exchange, Reply
from router.loop_metrics import LoopHistogramChild
from router.metrics import GatewayMetrics
from router.result_cache import render_body, render_stream
from router.upstream.call import UpstreamCall
from router.upstream.dispatch import Dispatcher
from router.upstream.migration import Migrator
from router.upstream.sse import error_event
from router.upstream.stream import Answer, StreamBroken

STREAMED = 200


def body_reply(answer: Answer) -> Reply:
    return Reply(200, answer.body, reply_headers(answer.call, answer.decision))


async def stream_reply(
    exchange: Exchange,
    answer: Answer,
    dispatcher: Dispatcher,
    migrator: Migrator,
    metrics: GatewayMetrics,
    deadline: float,
) -> Reply:
    """Write a streamed answer until its end, a break it cannot migrate past, or `deadline`
    (loop time). The first answer is the caller's to close; continuations are closed here."""
    call, result = answer.call, answer.result
    headers = reply_headers(call, answer.decision)
    gaps = metrics.model(call.pool.name).inter_token
    first = answer
    sink: ClientStream | None = None
    scope = asyncio.timeout_at(deadline)
    try:
        async with scope:
            while True:
                try:
                    if sink is None:
                        block = await answer.next_block()
                        sink = await exchange.open_stream(headers, block or b"", gaps)
                        sink.first_written(result)
                        if block is None:
                            break
                    await answer.pump(sink)
                    break
                except StreamBroken as exc:
                    if answer.saw_done:
                        break  # after its [DONE]: the client has the whole answer
                    # The worker broke: book it, then let another one continue the answer.
                    dispatcher.stream_broke(answer, exc.cause)
                    continued = await migrator.resume(answer, exc.cause, deadline)
                    if continued is None:
                        answer.result.stream_broken = True
                        metrics.stream_errors.labels(call.pool.name).inc()
                        await _end_with_error(
                            exchange,
                            sink,
                            headers,
                            gaps,
                            f"the worker serving this request failed mid-stream ({exc.cause})",
                            "upstream_stream_broken",
                        )
                        return Reply(STREAMED, None)
                    answer.close()  # idempotent: the broken worker's count ends now
                    answer = continued
    except TimeoutError:
        if not scope.expired():
            raise
        if not answer.saw_done:  # after its [DONE], the client had the whole answer
            dispatcher.stream_overdue(answer)
            metrics.stream_errors.labels(call.pool.name).inc()
            await _end_with_error(
                exchange, sink, headers, gaps, "the request ran past its total deadline", "timeout"
            )
            return Reply(STREAMED, None)
    finally:
        if answer is not first:
            answer.close()
    return await _ended(exchange, dispatcher, answer)


async def _ended(exchange: Exchange, dispatcher: Dispatcher, answer: Answer) -> Reply:
    """The client's answer ends first, then the books (policy, index, learned rates): the
    client's last byte does not wait for them. A client that read [DONE] may hang up before
    the last chunk: nothing was lost."""
    try:
        with contextlib.suppress(ConnectionError):
            await exchange.end_stream()
    finally:
        dispatcher.stream_ended(answer)
    return Reply(STREAMED, None)


async def _end_with_error(
    exchange: Exchange,
    sink: ClientStream | None,
    headers: dict[str, str],
    gaps: LoopHistogramChild,
    message: str,
    code: str,
) -> None:
    event = error_event(message, "upstream_error", code)
    with contextlib.suppress(ConnectionError):
        if sink is None:
            # Broken before its first block: the head goes out with the error event.
            await exchange.open_stream(headers, event, gaps)
        else:
            sink.write(event)
        await exchange.end_stream()


def reply_headers(call: UpstreamCall, decision: Decision) -> dict[str, str]:
    headers = {"X-Request-Id": call.request_id}
    if call.extra_headers:
        headers.update(call.extra_headers)
    if call.debug_headers:
        headers["X-Route-Worker"] = decision.worker.id
        headers["X-Route-Reason"] = decision.reason
        headers["X-Route-Matched-Tokens"] = str(decision.matched_tokens)
    return headers


async def reply_from_cache(
    exchange: Exchange,
    metrics: GatewayMetrics,
    kind: str,
    model: str,
    entry: dict[str, Any],
    stream: bool,
    with_usage: bool,
    headers: dict[str, str],
    transform: Callable[[bytes], bytes] | None = None,
) -> Reply:
    headers = {**headers, "X-Cache": "hit"}
    if not stream:
        return Reply(200, json.dumps(render_body(kind, model, entry)).encode(), headers)
    events = render_stream(kind, model, entry, with_usage)
    block = transform(events) if transform is not None else events
    await exchange.open_stream(headers, block, metrics.model(model).inter_token)
    await exchange.end_stream()
    return Reply(STREAMED, None)
