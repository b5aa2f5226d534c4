"""The request as it goes upstream: the body the worker gets, and the call the dispatcher runs.

The body goes upstream unchanged except where the gateway must change it: an alias is replaced
by the pool's served name (a LoRA adapter keeps its own), and a streamed request asks for the
usage chunk (dropped again from the client's stream unless it asked for it). A body that needs
no change is forwarded as the client's bytes, without re-serializing it.
"""

from __future__ import annotations

import json
from typing import Any

from router.domain.policy import RoutingRequest
from router.domain.pool import Pool
from router.http.body import Kind
from router.http.context import GatewayState
from router.http.exchange import Exchange
from router.upstream.call import UpstreamCall

_PATHS: dict[Kind, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


def session_hint(exchange: Exchange, body: dict[str, Any]) -> str | None:
    """Affinity hints any client may send: X-Session-Id, `user`, seed API metadata.session_id."""
    header = exchange.headers.get("X-Session-Id")
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


def upstream_call(
    exchange: Exchange,
    state: GatewayState,
    pool: Pool,
    body: dict[str, Any],
    raw: bytes | None,
    kind: Kind,
    key: str,
    prompt_tokens: int,
    max_tokens: int,
    adapter: str | None = None,
) -> UpstreamCall:
    stream = body.get("stream") is True
    changed = raw is None
    served = adapter or pool.name  # a LoRA adapter is asked for by its own name
    if body["model"] != served:
        body["model"] = served
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
        session_id=session_hint(exchange, body),
        adapter=adapter,
    )
    return UpstreamCall(
        pool=pool,
        routing=routing,
        path=_PATHS[kind],
        body=payload,
        stream=stream,
        request_id=exchange.request_id,
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
