"""The OpenAI endpoints: `/v1/chat/completions`, `/v1/completions` and `/v1/models`.

A handler reads and checks the body, finds the pool by model name, builds the routing request,
and hands the call to the proxy. The body goes upstream unchanged except where the gateway must
change it: an alias is replaced by the pool's served name, and a streamed request asks for the
usage chunk (dropped again from the client's stream unless it asked for it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from router.admission import PRIORITY_RANK, PoolGate
from router.auth import Tenant, check_model
from router.domain.policy import Decision, RoutingRequest
from router.domain.pool import Pool
from router.errors import InvalidRequest, NoCapacity
from router.http.body import Kind, check_fields, parse_json_object, read_body, require_model
from router.http.context import ACCESS, TENANT, GatewayState, request_id_of, state_of
from router.result_cache import (
    Capture,
    cache_digest,
    entry_from_body,
    is_deterministic,
    respond_from_cache,
)
from router.routing.key import routing_key
from router.upstream.call import CallResult, UpstreamCall

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


async def authenticated_body(
    request: web.Request, state: GatewayState
) -> tuple[bytes, dict[str, Any]]:
    """Who is calling (before anything is read), then the body as a checked JSON object."""
    request[TENANT] = state.auth.authenticate(request)
    limits = state.config.limits
    raw = await read_body(request, limits.max_body_bytes)
    return raw, parse_json_object(raw, limits.max_json_depth)


def allowed_pool(
    request: web.Request, state: GatewayState, body: dict[str, Any], kind: Kind
) -> tuple[Pool, int | None]:
    """The pool serving the body's model, if the caller may use it; and the max tokens asked."""
    require_model(body)
    pool = state.registry.pool_for(body.get("model"))
    check_model(request[TENANT], pool.name)
    return pool, check_fields(body, kind, pool.config.max_tokens_limit)


async def completions(request: web.Request, kind: Kind) -> web.StreamResponse:
    state = state_of(request)
    raw, body = await authenticated_body(request, state)
    _, max_tokens = allowed_pool(request, state, body, kind)
    return await forward_openai(request, state, body, raw, kind, max_tokens)


def priority_of(request: web.Request, tenant: Tenant) -> str:
    """The tenant's class; `X-Priority` counts only for keys allowed to steer routing."""
    if tenant.allow_routing_headers:
        asked = request.headers.get("X-Priority", "").lower()
        if asked in PRIORITY_RANK:
            return asked
    return tenant.priority


def _choose_gate(state: GatewayState, pool: Pool) -> PoolGate:
    """The pool itself, or its first fallback with room when it has none."""
    gate = state.admission.gate(pool)
    if pool.candidates() and not gate.saturated:
        return gate
    for name in pool.config.fallback_pools:
        fallback = state.registry.pools.get(name)
        if fallback is None:
            continue
        fallback_gate = state.admission.gate(fallback)
        if fallback.candidates() and not fallback_gate.saturated:
            return fallback_gate
    if not pool.candidates():
        raise NoCapacity(f"no healthy worker can serve model `{pool.name}` now", retry_after_s=1.0)
    return gate  # saturated: wait in its queue


async def forward_openai(
    request: web.Request,
    state: GatewayState,
    body: dict[str, Any],
    raw: bytes | None,
    kind: Kind,
    max_tokens: int | None,
    *,
    transform: Callable[[bytes], bytes] | None = None,
) -> web.StreamResponse:
    """Limit, admit, route and relay an already-checked OpenAI body (also used by the seed API,
    whose `transform` rewrites each relayed block of stream events into its own shape)."""
    tenant = request.get(TENANT) or state.auth.authenticate(request)
    pool = state.registry.pool_for(body.get("model"))
    requested_tokens = max_tokens or DEFAULT_MAX_TOKENS
    key = routing_key(body, kind)
    # Precise pools tokenize and hash the prompt as their workers will, once per request.
    precise = pool.keyer.key(body, kind == "chat") if pool.keyer is not None else None
    prompt_tokens = (
        max(1, precise.prompt_tokens) if precise else pool.calibration.estimate_tokens(key)
    )
    if prompt_tokens > pool.config.max_prompt_tokens:
        raise InvalidRequest(
            f"the prompt is about {prompt_tokens} tokens, over this model's limit of "
            f"{pool.config.max_prompt_tokens}",
            param="messages" if kind == "chat" else "prompt",
            code="context_length_exceeded",
        )
    gate = _choose_gate(state, pool)
    pool = gate.pool
    charge = await state.limiter.admit(
        tenant, prompt_tokens + requested_tokens, state.config.timeouts.total_s
    )
    result = CallResult()
    request[ACCESS] = result
    overloaded = gate.saturated  # judged on arrival: the request's own slot does not count
    try:
        async with state.admission.slot(gate, priority_of(request, tenant)):
            cap = pool.config.overload_max_tokens
            if cap is not None and overloaded and requested_tokens > cap:
                body["max_tokens"] = cap
                body.pop("max_completion_tokens", None)
                requested_tokens = cap
                raw = None
            call = _upstream_call(
                request, state, pool, body, raw, kind, key, prompt_tokens, requested_tokens
            )
            call.routing.block_hashes = precise.block_hashes if precise else None
            call.extra_headers = charge.headers
            call.transform = transform
            session = call.routing.session_id
            if session is not None:
                call.routing.session_worker = await state.fleet.session_worker(pool.name, session)
            call.on_decision = lambda decision: _share_decision(state, decision, session)
            if not pool.config.result_cache.enabled or not is_deterministic(body):
                return await state.proxy.forward(request, call, result)
            return await _through_result_cache(
                request, state, pool, kind, body, call, result, tenant.name
            )
    finally:
        usage = result.usage
        await charge.settle(usage.prompt_tokens + usage.completion_tokens if usage else None)


def _share_decision(state: GatewayState, decision: Decision, session: str | None) -> None:
    """Tell the other replicas where this request goes (sessions and index inserts)."""
    worker = decision.worker
    if session is not None:
        state.fleet.remember_session(worker.pool, session, worker.id)
    if decision.block_keys:
        state.fleet.publish_insert(worker.pool, worker.id, decision.block_keys)


async def _through_result_cache(
    request: web.Request,
    state: GatewayState,
    pool: Pool,
    kind: Kind,
    body: dict[str, Any],
    call: UpstreamCall,
    result: CallResult,
    tenant: str,
) -> web.StreamResponse:
    """Answer an exact repeat from the cache; otherwise relay and remember the answer."""
    digest = cache_digest(pool.name, kind, body)
    lookups = state.metrics.result_cache
    entry = await state.result_cache.get(tenant, digest)
    if entry is not None:
        lookups.labels(pool.name, "hit").inc()
        result.status = 200
        return await respond_from_cache(
            request,
            kind,
            pool.name,
            entry,
            call.stream,
            call.client_wants_usage,
            call.extra_headers or {},
            call.transform,
        )
    lookups.labels(pool.name, "miss").inc()
    capture = Capture()
    if call.stream:
        call.transform = capture.wrap(call.transform)
    response = await state.proxy.forward(request, call, result)
    if result.status == 200 and not result.stream_broken:
        if call.stream:
            new_entry = capture.entry_from_stream(kind)
        else:
            raw = response.body if isinstance(response, web.Response) else None
            new_entry = entry_from_body(kind, raw) if isinstance(raw, bytes) else None
        if new_entry is not None:
            config = pool.config.result_cache
            await state.result_cache.put(
                tenant, digest, new_entry, config.ttl_s, config.max_entry_bytes
            )
    return response


def _upstream_call(
    request: web.Request,
    state: GatewayState,
    pool: Pool,
    body: dict[str, Any],
    raw: bytes | None,
    kind: Kind,
    key: str,
    prompt_tokens: int,
    max_tokens: int,
) -> UpstreamCall:
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
            # Splice only when the key is absent: a `"stream_options": null` later in the raw
            # body would override a spliced one, so that case is re-serialized instead.
            splice_usage = "stream_options" not in body
            body["stream_options"] = {
                **(options if isinstance(options, dict) else {}),
                "include_usage": True,
            }
            changed = changed or not splice_usage
    if changed or raw is None:
        payload = json.dumps(body).encode()
    elif splice_usage:
        payload = _with_usage_option(raw)
    else:
        payload = raw
    routing = RoutingRequest(
        model=pool.name,
        key=key,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        session_id=session_hint(request, body),
    )
    return UpstreamCall(
        pool=pool,
        routing=routing,
        path=_PATHS[kind],
        body=payload,
        stream=stream,
        request_id=request_id_of(request),
        client_wants_usage=client_wants_usage,
        debug_headers=state.config.debug_headers,
        collect_answer=pool.policy.indexes_answers and body.get("n") in (None, 1),
    )


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
