"""The OpenAI endpoints: `/v1/chat/completions`, `/v1/completions` and `/v1/models`.

A handler authenticates the caller, reads and checks the body, finds the pool by model name and
checks the caller may use it; the rest of the request's path is the pipeline's.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from router.auth import check_model
from router.domain.pool import Pool
from router.http.aio import exchange_of, to_response
from router.http.body import Kind, check_fields, parse_json_object, require_model
from router.http.context import GatewayState, state_of
from router.http.exchange import Exchange, Reply
from router.http.pipeline import forward_openai


async def authenticated_body(
    exchange: Exchange, state: GatewayState
) -> tuple[bytes, dict[str, Any]]:
    """Who is calling (before anything is read), then the body as a checked JSON object."""
    exchange.tenant = state.auth.authenticate(exchange.headers)
    limits = state.config.limits
    raw = await exchange.read_body(limits.max_body_bytes)
    return raw, parse_json_object(raw, limits.max_json_depth)


def allowed_pool(
    exchange: Exchange, state: GatewayState, body: dict[str, Any], kind: Kind
) -> tuple[Pool, int | None]:
    """The pool serving the body's model, if the caller may use it; and the max tokens asked."""
    require_model(body)
    tenant = exchange.tenant
    assert tenant is not None, "authenticated_body ran first"
    pool, adapter = state.registry.resolve(body.get("model"), tenant.may_use)
    # An adapter is the pool's model fine-tuned: a key allowed the pool may use its adapters,
    # and a key may be allowed one adapter alone.
    if adapter is None or not tenant.may_use(adapter):
        check_model(tenant, pool.name)
    return pool, check_fields(body, kind, pool.config.max_tokens_limit)


async def completions(exchange: Exchange, state: GatewayState, kind: Kind) -> Reply:
    raw, body = await authenticated_body(exchange, state)
    _, max_tokens = allowed_pool(exchange, state, body, kind)
    return await forward_openai(exchange, state, body, raw, kind, max_tokens)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    exchange = exchange_of(request)
    return to_response(exchange, await completions(exchange, state_of(request), "chat"))


async def text_completions(request: web.Request) -> web.StreamResponse:
    exchange = exchange_of(request)
    return to_response(exchange, await completions(exchange, state_of(request), "completions"))


async def list_models(request: web.Request) -> web.Response:
    state = state_of(request)
    tenant = state.auth.authenticate(request.headers)  # 401 without a key, as vLLM answers
    now = int(state.started_at_wall or time.time())
    data: list[dict[str, Any]] = []
    for name, pool in state.registry.pools.items():
        pool_allowed = tenant.may_use(name)
        if pool_allowed:
            data.extend(_card(model, name, None, now) for model in (name, *pool.config.aliases))
        for adapter in sorted(state.registry.adapters(pool)):
            if pool_allowed or tenant.may_use(adapter):
                data.append(_card(adapter, adapter, name, now))  # its path stays the gateway's
    return web.json_response({"object": "list", "data": data})


def _card(model: str, root: str, parent: str | None, created: int) -> dict[str, Any]:
    return {
        "id": model,
        "object": "model",
        "created": created,
        "owned_by": "prefix-router",
        "root": root,
        "parent": parent,
    }
