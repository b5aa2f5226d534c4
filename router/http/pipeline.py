"""The request path after the handler checked the body: limit, admit, route, relay, record.

Each stage is one module's job (DESIGN §3): the rate limiter charges the tenant, admission gives
the request a slot in its pool (or a fallback pool with room), `outbound` builds the upstream
call, the dispatcher picks a worker and gets an answer's first byte (retrying elsewhere before
it), `respond` writes the answer to the client, and the ending is recorded (the policy's
outcome, sticky session and index inserts shared with other replicas, usage reconciled).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from typing import Any

from router.admission import PRIORITY_RANK, PoolGate
from router.auth import Tenant
from router.domain.policy import Decision
from router.domain.pool import Pool
from router.errors import InvalidRequest, NoCapacity
from router.http.body import Kind
from router.http.context import GatewayState
from router.http.exchange import Exchange, Reply
from router.http.outbound import upstream_call
from router.http.respond import body_reply, reply_from_cache, stream_reply
from router.result_cache import (
    Capture,
    cache_digest,
    entry_from_body,
    is_deterministic,
)
from router.routing.key import cache_partition, routing_key
from router.upstream.call import CallResult, MigrationPlan, UpstreamCall
from router.upstream.continuation import Kind as ContinuationKind
from router.upstream.continuation import Transcript, refusal

DEFAULT_MAX_TOKENS = 16


def priority_of(exchange: Exchange, tenant: Tenant) -> str:
    """The tenant's class; `X-Priority` counts only for keys allowed to steer routing."""
    if tenant.allow_routing_headers:
        asked = exchange.headers.get("X-Priority", "").lower()
        if asked in PRIORITY_RANK:
            return asked
    return tenant.priority


def _choose_gate(
    state: GatewayState,
    pool: Pool,
    tenant: Tenant,
    prompt_tokens: int,
    max_tokens: int | None,
    adapter: str | None,
) -> tuple[PoolGate, bool]:
    """The pool itself, or its first fallback with room when it has none; and whether the
    gate chosen is saturated (the request waits in its queue). A fallback serves only tenants
    allowed its model and requests within its own limits: falling back never widens what a
    key may use or what a pool accepts."""
    gate = state.admission.gate(pool)
    routable = bool(pool.candidates(adapter))
    if routable and not gate.saturated:
        return gate, False
    for name in pool.config.fallback_pools:
        fallback = state.registry.pools.get(name)
        if fallback is None or not tenant.may_use(fallback.name):
            continue
        limits = fallback.config
        if prompt_tokens > limits.max_prompt_tokens or (max_tokens or 0) > limits.max_tokens_limit:
            continue
        fallback_gate = state.admission.gate(fallback)
        if fallback.candidates(adapter) and not fallback_gate.saturated:
            return fallback_gate, False
    if not routable:
        raise NoCapacity(f"no healthy worker can serve model `{pool.name}` now", retry_after_s=1.0)
    return gate, True  # saturated: wait in its queue


async def forward_openai(
    exchange: Exchange,
    state: GatewayState,
    body: dict[str, Any],
    raw: bytes | None,
    kind: Kind,
    max_tokens: int | None,
    *,
    transform: Callable[[bytes], bytes] | None = None,
) -> Reply:
    """Limit, admit, route and relay an already-checked OpenAI body (also used by the seed API,
    whose `transform` rewrites each relayed block of stream events into its own shape)."""
    tenant = exchange.tenant or state.auth.authenticate(exchange.headers)
    pool, adapter = state.registry.resolve(body.get("model"))
    requested_tokens = max_tokens or DEFAULT_MAX_TOKENS
    if tenant.cache_salt is not None:
        salt_for_tenant(body, tenant.cache_salt)
        raw = None  # the body changed: it is serialized again on the way out
    key = routing_key(body, kind)
    partition = cache_partition(body, adapter)
    lora = None
    if adapter is not None:
        path = state.registry.adapters(pool).get(adapter)
        lora = (adapter, path) if path is not None else None
        await state.adapters.ensure(pool, adapter, path)
    # Precise pools tokenize and hash the prompt as their workers will, once per request
    # (a long prompt off the event loop).
    chat = kind == "chat"
    keyer = pool.keyer
    precise = await keyer.key_async(body, chat, len(key), lora) if keyer is not None else None
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
    # Overload is judged on arrival: the request's own slot does not count.
    gate, overloaded = _choose_gate(state, pool, tenant, prompt_tokens, max_tokens, adapter)
    if gate.pool is not pool:
        pool = gate.pool
        # The fallback's workers may tokenize differently: its own key, if it is precise.
        keyer = pool.keyer
        precise = await keyer.key_async(body, chat, len(key), lora) if keyer is not None else None
    charge = await state.limiter.admit(
        tenant, prompt_tokens + requested_tokens, state.config.timeouts.total_s
    )
    result = CallResult()
    exchange.access = result
    try:
        async with state.admission.slot(gate, priority_of(exchange, tenant)):
            cap = pool.config.overload_max_tokens
            if cap is not None and overloaded and requested_tokens > cap:
                body["max_tokens"] = cap
                body.pop("max_completion_tokens", None)
                requested_tokens = cap
                raw = None
            call = upstream_call(
                exchange,
                state,
                pool,
                body,
                raw,
                kind,
                key,
                prompt_tokens,
                requested_tokens,
                adapter,
            )
            call.routing.block_hashes = precise.block_hashes if precise else None
            call.routing.partition = partition
            if call.stream:
                plan_migration(call, body, kind)
            call.extra_headers = charge.headers
            call.transform = transform
            session = call.routing.session_id
            if session is not None:
                # Sessions are the tenant's own: two tenants' equal ids are two sessions.
                call.routing.session_id = f"{tenant.name}\x1f{session}"
                call.routing.session_worker = await state.fleet.session_worker(
                    pool.name, tenant.name, session
                )
            # Not a closure over `call`: stored on it, that made the call a reference cycle
            # freed only by the collector (15 objects a request; with another cycle, a 10 ms
            # collection every 0.65 s at 1000 req/s, `tests/integration/test_no_cycles.py`).
            call.on_decision = partial(
                _share_decision,
                state,
                tenant=tenant.name,
                session=session,
                prompt_tokens=prompt_tokens,
            )
            call.share_insert = partial(state.fleet.publish_insert, pool.name)
            if not pool.config.result_cache.enabled or not is_deterministic(body):
                return await relay(exchange, state, call, result)
            return await _through_result_cache(
                exchange, state, pool, kind, body, call, result, tenant.name
            )
    finally:
        usage = result.usage
        await charge.settle(usage.prompt_tokens + usage.completion_tokens if usage else None)


def salt_for_tenant(body: dict[str, Any], salt: str) -> None:
    """Put the tenant's secret salt in front of the request's own `cache_salt`: the request's
    prefix cache is then its tenant's alone, whatever salt the client sent (a client cannot
    name another tenant's partition)."""
    own = body.get("cache_salt")
    body["cache_salt"] = salt if own is None else f"{salt}:{own}"


def _share_decision(
    state: GatewayState,
    decision: Decision,
    tenant: str,
    session: str | None,
    prompt_tokens: int,
) -> None:
    """Tell the other replicas where this request goes (sessions, index inserts and the
    prefill it queues there)."""
    worker = decision.worker
    if session is not None:
        pool = state.registry.pools.get(worker.pool)
        ttl_s = pool.config.session_ttl_s if pool is not None else None
        state.fleet.remember_session(worker.pool, tenant, session, worker.id, ttl_s)
    if decision.block_keys:
        prefill = max(0, prompt_tokens - decision.matched_tokens)
        state.fleet.publish_insert(worker.pool, worker.id, decision.block_keys, prefill)


async def _through_result_cache(
    exchange: Exchange,
    state: GatewayState,
    pool: Pool,
    kind: Kind,
    body: dict[str, Any],
    call: UpstreamCall,
    result: CallResult,
    tenant: str,
) -> Reply:
    """Answer an exact repeat from the cache; otherwise relay and remember the answer."""
    digest = cache_digest(pool.name, kind, body)
    lookups = state.metrics.result_cache
    entry = await state.result_cache.get(tenant, digest)
    if entry is not None:
        lookups.labels(pool.name, "hit").inc()
        result.status = 200
        return await reply_from_cache(
            exchange,
            state.metrics,
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
    reply = await relay(exchange, state, call, result)
    if result.status == 200 and not result.stream_broken:
        if call.stream:
            new_entry = capture.entry_from_stream(kind)
        else:
            new_entry = entry_from_body(kind, reply.body) if reply.body is not None else None
        if new_entry is not None:
            config = pool.config.result_cache
            await state.result_cache.put(
                tenant, digest, new_entry, config.ttl_s, config.max_entry_bytes
            )
    return reply


async def relay(
    exchange: Exchange, state: GatewayState, call: UpstreamCall, result: CallResult
) -> Reply:
    """Dispatch the call and write its answer; the total deadline covers both."""
    deadline = asyncio.get_running_loop().time() + state.config.timeouts.total_s
    answer = await state.dispatcher.dispatch(call, result, deadline)
    try:
        if not call.stream:
            return body_reply(answer)
        return await stream_reply(
            exchange, answer, state.dispatcher, state.migrator, state.metrics, deadline
        )
    finally:
        answer.close()


def plan_migration(call: UpstreamCall, body: dict[str, Any], kind: Kind) -> None:
    """Let a stream be continued on another worker if its own breaks (its pool permitting)."""
    allowed = call.pool.config.migrations
    if allowed <= 0:
        return
    wire_kind: ContinuationKind = "chat" if kind == "chat" else "completions"
    call.migration = MigrationPlan(
        body=body, kind=wire_kind, allowed=allowed, refused=refusal(body, wire_kind)
    )
    if call.migration.refused is None:
        call.transcript = Transcript(wire_kind)
