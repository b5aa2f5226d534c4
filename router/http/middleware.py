"""The edge: request ids, mapping every error to an OpenAI-shaped body, request metrics.

Nothing past this middleware renders an error; nothing a client sees is a traceback. Once a
model request ended, `record` turns what the relay learned (`CallResult`) into the request
metrics, the `/stats` tallies and one JSON access-log line, all keyed by bounded names
(pool, worker, tenant), never by request data.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from aiohttp import web

from router.auth import Tenant
from router.errors import (
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
)
from router.http.aio import EXCHANGE, AiohttpExchange, to_response
from router.http.context import GatewayState, new_request_id, state_of
from router.http.exchange import Exchange, Reply
from router.logs import AccessLog
from router.upstream.call import CallResult

log = logging.getLogger("prefix_router.http")
access_log = logging.getLogger("prefix_router.access")
ACCESS_LOG = AccessLog(access_log)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MODEL_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/generate", "/chat"})


def error_reply(error: GatewayError, request_id: str) -> Reply:
    headers = error.headers()
    headers["X-Request-Id"] = request_id
    return Reply(error.status, error.body_bytes(), headers)


def _from_http_exception(exc: web.HTTPException) -> GatewayError:
    if isinstance(exc, web.HTTPNotFound):
        return NotFound("no such endpoint", code="not_found")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return MethodNotAllowed(
            f"method {exc.method} not allowed here; use {allowed}", headers={"Allow": allowed}
        )
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return PayloadTooLarge("request body is too large")
    error = InvalidRequest(exc.reason or "bad request")
    error.status = exc.status
    return error


CLIENT_GONE = 499


class Outcome:
    """What the edge knows of a request once it ended: its status and when its first byte left
    (for an answer handed back unsent, the moment it was handed back)."""

    __slots__ = ("first_byte_at", "started", "status")

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.status = 500
        self.first_byte_at = 0.0

    def answered(self, reply: Reply) -> Reply:
        self.status = reply.status
        if reply.body is not None:
            self.first_byte_at = time.perf_counter()
        return reply


def failure_reply(exc: BaseException, exchange: Exchange, outcome: Outcome) -> Reply:
    """The OpenAI error for what a handler raised; a client that went away is re-raised
    (there is nobody to answer), counted as 499 as nginx counts it."""
    request_id = exchange.request_id
    if isinstance(exc, GatewayError):
        return outcome.answered(error_reply(exc, request_id))
    if isinstance(exc, TimeoutError):
        error = GatewayError("the request ran past its total deadline", code="timeout")
        error.status = 504
        return outcome.answered(error_reply(error, request_id))
    if isinstance(exc, ConnectionResetError | asyncio.CancelledError):
        # Before or after the first byte, there is nothing left to answer.
        outcome.status = CLIENT_GONE
        raise exc
    if not isinstance(exc, Exception):
        raise exc
    log.error("unhandled error, request %s", request_id, exc_info=exc)
    return outcome.answered(error_reply(GatewayError("internal gateway error"), request_id))


@web.middleware
async def edge(request: web.Request, handler: Handler) -> web.StreamResponse:
    exchange = AiohttpExchange(request, new_request_id(request.headers.get("X-Request-Id")))
    request[EXCHANGE] = exchange
    outcome = Outcome()
    try:
        response = await handler(request)
        outcome.status = response.status
        if not response.prepared:
            outcome.first_byte_at = time.perf_counter()
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        reply = outcome.answered(error_reply(_from_http_exception(exc), exchange.request_id))
        return to_response(exchange, reply)
    except BaseException as exc:
        # aiohttp cancels the handler when the client hangs up: failure_reply re-raises that.
        return to_response(exchange, failure_reply(exc, exchange, outcome))
    finally:
        if request.path in MODEL_PATHS:
            record(state_of(request), exchange, outcome)


class Recorded(Protocol):
    """What `record` reads of a request: an `Exchange`, or a request the front refused before
    any handler ran (`front.protocol.Refusal`)."""

    @property
    def request_id(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def tenant(self) -> Tenant | None: ...
    @property
    def access(self) -> CallResult | None: ...


def record_refusal(state: GatewayState, refused: Recorded, status: int) -> None:
    """A request answered with an error before it was whole (413, 431, 400)."""
    outcome = Outcome()
    outcome.status = status
    record(state, refused, outcome)


def record(state: GatewayState, exchange: Recorded, outcome: Outcome) -> None:
    """The request's metrics, `/stats` tallies and access-log line, once it ended."""
    status, started, first_byte_at = outcome.status, outcome.started, outcome.first_byte_at
    request_id = exchange.request_id
    result = exchange.access
    elapsed = time.perf_counter() - started
    model = result.decision.worker.pool if result and result.decision else "-"
    policy = "-"
    if result is not None and result.decision is not None:
        pool = state.registry.pools.get(model)
        policy = pool.policy.name if pool else "-"
    if result is not None and result.status and status != CLIENT_GONE:
        status = result.status  # what the worker answered (a stream's 200 was sent early)
    m = state.metrics.model(model)
    m.requests(status, policy).inc()
    m.request_duration.observe(elapsed)
    usage = result.usage if result is not None else None
    if result is not None:
        if result.ttft_s is not None:
            m.ttft.observe(result.ttft_s)
        if usage is not None:
            m.prompt_tokens.inc(usage.prompt_tokens)
            m.cached_tokens.inc(usage.cached_tokens)
            m.completion_tokens.inc(usage.completion_tokens)
        overhead_s = _overhead_s(result, started, first_byte_at)
        if overhead_s is not None:
            m.gateway_overhead.observe(overhead_s)
    worker = result.worker.id if result and result.worker else None
    ok = status == 200 and not (result is not None and result.stream_broken)
    state.stats.record(
        model if worker else None,
        worker,
        ok,
        elapsed,
        result.ttft_s if result else None,
        usage,
    )
    tenant = exchange.tenant
    if access_log.isEnabledFor(logging.INFO):  # the line's fields cost only when logged
        ACCESS_LOG.emit(
            {
                "request_id": request_id,
                "path": exchange.path,
                "model": model,
                "status": status,
                "tenant": tenant.name if tenant else None,
                "worker": worker,
                # More than one when the stream was migrated: every segment's worker, in order.
                "segments": result.segments if result and len(result.segments) > 1 else None,
                "prefill_worker": result.prefill_worker if result else None,  # P/D pools
                "reason": result.decision.reason if result and result.decision else None,
                "attempts": result.attempts if result else 0,
                "retries": max(0, result.attempts - 1) if result else 0,
                "ttft_s": round(result.ttft_s, 6) if result and result.ttft_s else None,
                "prompt_tokens": usage.prompt_tokens if usage else None,
                "cached_tokens": usage.cached_tokens if usage else None,
                "completion_tokens": usage.completion_tokens if usage else None,
                "duration_s": round(elapsed, 6),
            }
        )


def _overhead_s(result: CallResult, started: float, first_byte_at: float) -> float | None:
    """Client-side time to first byte minus the worker's own: what the gateway added.

    A stream's first byte is its first relayed event; an unstreamed answer's is the moment the
    handler returned it (the worker's part then ends at its last byte)."""
    if result.upstream_ttfb_s is None:
        return None
    at = result.first_write_at or first_byte_at
    if not at:
        return None
    return max(0.0, at - started - result.upstream_ttfb_s)
