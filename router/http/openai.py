"""The OpenAI endpoints: `/v1/chat/completions`, `/v1/completions` and `/v1/models`.

A handler reads and checks the body, finds the pool by model name, builds the routing request,
and hands the call to the proxy. The body goes upstream unchanged except where the gateway must
change it: an alias is replaced by the pool's served name, and a streamed request asks for the
usage chunk (dropped again from the client's stream unless it asked for it).
"""

from __future__ import annotations

import json
import time
from typing import Any

from aiohttp import web

from router.auth import check_model
from router.http.body import Kind, check_fields, parse_json_object, read_body, require_model
from router.http.context import ACCESS, GatewayState, request_id_of, state_of
from router.routing.key import estimate_prompt_tokens, routing_key
from router.routing.policy import RoutingRequest
from router.upstream.proxy import CallResult, UpstreamCall

_PATHS: dict[Kind, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
DEFAULT_MAX_TOKENS = 16


def session_hint(request: web.Request, body: dict[str, Any]) -> str | None:
    """Affinity hints any client may send: X-Session-Id, `user`, seed API metadata.session_id."""
    header = request.headers.get("X-Session-Id")
    if header:
        return header[:256]
    user = body.get("user")
    if isinstance(user, str) and user:
        return user[:256]
    metadata = body.get("metadata")
    if isinstance(metadata, dict):
        session = metadata.get("session_id")
        if isinstance(session, str) and session:
            return session[:256]
    return None


async def completions(request: web.Request, kind: Kind) -> web.StreamResponse:
    state = state_of(request)
    config = state.config
    tenant = state.auth.authenticate(request)
    raw = await read_body(request, config.limits.max_body_bytes)
    body = parse_json_object(raw, config.limits.max_json_depth)
    require_model(body)
    pool = state.registry.pool_for(body.get("model"))
    check_model(tenant, pool.name)
    max_tokens = check_fields(body, kind, pool.config.max_tokens_limit)
    return await forward_openai(request, state, body, raw, kind, max_tokens)


async def forward_openai(
    request: web.Request,
    state: GatewayState,
    body: dict[str, Any],
    raw: bytes | None,
    kind: Kind,
    max_tokens: int | None,
) -> web.StreamResponse:
    """Route and relay an already-checked OpenAI body (also used by the seed API)."""
    pool = state.registry.pool_for(body.get("model"))
    stream = body.get("stream") is True
    changed = raw is None
    if body["model"] != pool.name:
        body["model"] = pool.name
        changed = True
    client_wants_usage = True
    splice_usage = False
    if stream:
        options = body.get("stream_options")
        client_wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        if not client_wants_usage:
            body["stream_options"] = {**(options or {}), "include_usage": True}
            splice_usage = options is None
            changed = changed or not splice_usage
    if changed or raw is None:
        payload = json.dumps(body).encode()
    elif splice_usage:
        payload = _with_usage_option(raw)
    else:
        payload = raw

    key = routing_key(body, kind)
    routing = RoutingRequest(
        model=pool.name,
        key=key,
        prompt_tokens=estimate_prompt_tokens(key),
        max_tokens=max_tokens or DEFAULT_MAX_TOKENS,
        session_id=session_hint(request, body),
    )
    call = UpstreamCall(
        pool=pool,
        routing=routing,
        path=_PATHS[kind],
        body=payload,
        stream=stream,
        request_id=request_id_of(request),
        client_wants_usage=client_wants_usage,
        debug_headers=state.config.debug_headers,
    )
    result = CallResult()
    request[ACCESS] = result
    return await state.proxy.forward(request, call, result)


def _with_usage_option(raw: bytes) -> bytes:
    """Ask upstream for the usage chunk by splicing the option in front of the body's own
    fields: the body had no `stream_options`, so the result is the same JSON object plus one
    key, without re-serializing it on the hot path."""
    start = raw.index(b"{") + 1
    rest = raw[start:].lstrip()
    separator = b"" if rest.startswith(b"}") else b","
    return raw[:start] + b'"stream_options":{"include_usage":true}' + separator + raw[start:]


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await completions(request, "chat")


async def text_completions(request: web.Request) -> web.StreamResponse:
    return await completions(request, "completions")


async def list_models(request: web.Request) -> web.Response:
    state = state_of(request)
    now = int(state.started_at_wall or time.time())
    data = []
    for name, pool in state.registry.pools.items():
        for model in (name, *pool.config.aliases):
            data.append(
                {
                    "id": model,
                    "object": "model",
                    "created": now,
                    "owned_by": "prefix-router",
                    "root": name,
                    "parent": None,
                }
            )
    return web.json_response({"object": "list", "data": data})
