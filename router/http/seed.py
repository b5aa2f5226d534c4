"""The seed API (`reference/seed-api.md`): `POST /generate`, `POST /chat` and `GET /models`.

Each request is translated into an OpenAI body and sent through `forward_openai`, so
authentication, limits, admission, routing, retries, metrics and the access log apply exactly as
they do to `/v1/*`. A plain answer is read back and reshaped; a stream is rewritten event by
event by `SeedEvents`, which the relay applies to each block of complete events, so the seed
client sees `{"text", "request_id", "tokens_generated"}` pieces and one last `final` event
instead of OpenAI chunks and `[DONE]`. Errors keep the gateway's OpenAI shape.
"""

from __future__ import annotations

import json
import time
from typing import Any

from aiohttp import web

from router.errors import InvalidRequest
from router.http.aio import exchange_of, to_response
from router.http.body import Kind
from router.http.context import GatewayState, state_of
from router.http.exchange import Exchange, Reply
from router.http.openai import allowed_pool, authenticated_body
from router.http.ops import BACKEND_TYPE
from router.http.pipeline import forward_openai
from router.upstream.sse import EVENT_END

# Seed fields copied to the OpenAI body under the same name; vLLM takes top_k and
# repetition_penalty as extra sampling fields.
_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "stream")
_DONE_DATA = b"[DONE]"


def register(app: web.Application) -> None:
    app.router.add_post("/generate", generate)
    app.router.add_post("/chat", chat)
    app.router.add_get("/models", list_models)


async def generate(request: web.Request) -> web.StreamResponse:
    return await _serve(request, "completions")


async def chat(request: web.Request) -> web.StreamResponse:
    return await _serve(request, "chat")


def to_openai(seed: dict[str, Any], kind: Kind, default_model: str) -> dict[str, Any]:
    """The OpenAI body for a seed request; the seed's own field checks happen here."""
    body: dict[str, Any] = {"model": seed.get("model") or default_model}
    if kind == "completions":
        prompt = seed.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise InvalidRequest("`prompt` is required and must be a string", param="prompt")
        body["prompt"] = prompt
    else:
        body["messages"] = seed.get("messages")
    for name in _SAMPLING:
        if seed.get(name) is not None:
            body[name] = seed[name]
    top_k = seed.get("top_k")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool)):
        raise InvalidRequest("`top_k` must be an integer", param="top_k")
    penalty = seed.get("repetition_penalty")
    if penalty is not None and (not isinstance(penalty, int | float) or isinstance(penalty, bool)):
        raise InvalidRequest("`repetition_penalty` must be a number", param="repetition_penalty")
    stop = seed.get("stop_sequences")
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise InvalidRequest(
                "`stop_sequences` must be a list of strings", param="stop_sequences"
            )
        body["stop"] = stop
    metadata = seed.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise InvalidRequest("`metadata` must be an object", param="metadata")
    # The session (or else the user) becomes OpenAI's `user`: the affinity hint routing reads.
    hint = (metadata or {}).get("session_id") or (metadata or {}).get("user_id")
    if isinstance(hint, str) and hint:
        body["user"] = hint
    if body.get("stream") is True:
        # The final event reports the worker's own token count.
        body["stream_options"] = {"include_usage": True}
    return body


async def _serve(request: web.Request, kind: Kind) -> web.StreamResponse:
    exchange = exchange_of(request)
    return to_response(exchange, await _seed_reply(exchange, state_of(request), kind))


async def _seed_reply(exchange: Exchange, state: GatewayState, kind: Kind) -> Reply:
    _, seed = await authenticated_body(exchange, state)
    body = to_openai(seed, kind, state.registry.models()[0])
    pool, max_tokens = allowed_pool(exchange, state, body, kind)
    request_id = exchange.request_id
    if body.get("stream") is True:
        events = SeedEvents(request_id, kind)
        return await forward_openai(exchange, state, body, None, kind, max_tokens, transform=events)
    started = time.perf_counter()
    answer = await forward_openai(exchange, state, body, None, kind, max_tokens)
    elapsed = time.perf_counter() - started
    # A plain answer from the relay is always a complete, unsent JSON body.
    payload = json.loads(answer.body) if answer.body else {}
    reshaped = reshape(payload, kind, request_id, elapsed, pool.name)
    return Reply(200, json.dumps(reshaped).encode(), answer.headers)


def reshape(
    payload: dict[str, Any], kind: Kind, request_id: str, elapsed_s: float, model: str
) -> dict[str, Any]:
    """An OpenAI completion as the seed API's answer."""
    choices = payload.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    usage = payload.get("usage") or {}
    tokens = usage.get("completion_tokens", 0) if isinstance(usage, dict) else 0
    out: dict[str, Any] = {}
    if kind == "completions":
        out["text"] = choice.get("text", "")
    else:
        message = choice.get("message") or {}
        out["message"] = {
            "role": message.get("role", "assistant"),
            "content": message.get("content") or "",
        }
    out.update(
        {
            "request_id": request_id,
            "tokens_generated": tokens,
            "generation_time": round(elapsed_s, 6),
            "tokens_per_second": round(tokens / elapsed_s, 3) if elapsed_s > 0 else 0.0,
            "finish_reason": choice.get("finish_reason"),
            "metadata": {"model_name": payload.get("model", model), "backend": BACKEND_TYPE},
        }
    )
    return out


class SeedEvents:
    """Rewrites relayed OpenAI stream events into seed events, keeping the running count.

    Called with blocks of complete events only (the relay guarantees it). Text pieces become
    `{"text", "request_id", "tokens_generated"}`; the usage chunk is read, not shown; `[DONE]`
    becomes the `final` event. Error events pass unchanged: they are already the gateway's shape.
    """

    def __init__(self, request_id: str, kind: Kind) -> None:
        self._request_id = request_id
        self._chat = kind == "chat"
        self._pieces = 0
        self._finish_reason: str | None = None
        self._completion_tokens: int | None = None

    def __call__(self, block: bytes) -> bytes:
        out: list[bytes] = []
        for event in block.split(EVENT_END):
            if not event.startswith(b"data: "):
                continue
            data = event[6:].strip()
            if data == _DONE_DATA:
                out.append(self._final())
                continue
            try:
                payload = json.loads(data)
            except ValueError:
                continue
            if not isinstance(payload, dict):
                continue
            if "error" in payload:
                out.append(event + EVENT_END)
                continue
            usage = payload.get("usage")
            if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                self._completion_tokens = usage["completion_tokens"]
            for choice in payload.get("choices") or ():
                if isinstance(choice, dict):
                    out.extend(self._piece(choice))
        return b"".join(out)

    def _piece(self, choice: dict[str, Any]) -> list[bytes]:
        if choice.get("finish_reason"):
            self._finish_reason = choice["finish_reason"]
        if self._chat:
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else None
        else:
            text = choice.get("text")
        if not isinstance(text, str) or not text:
            return []
        self._pieces += 1
        return [
            _event({"text": text, "request_id": self._request_id, "tokens_generated": self._pieces})
        ]

    def _final(self) -> bytes:
        tokens = self._completion_tokens if self._completion_tokens is not None else self._pieces
        return _event(
            {
                "text": "",
                "request_id": self._request_id,
                "tokens_generated": tokens,
                "finish_reason": self._finish_reason,
                "final": True,
            }
        )


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + EVENT_END


async def list_models(request: web.Request) -> web.Response:
    """One entry per pool; what a gateway cannot know (size, context length) is null."""
    state = state_of(request)
    tenant = state.auth.authenticate(request.headers)
    models = [
        {
            "name": name,
            "type": "causal_lm",
            "parameters": None,
            "context_length": None,
            "loaded": pool.has_healthy_worker(),
            "backend": BACKEND_TYPE,
            "aliases": list(pool.config.aliases),
        }
        for name, pool in state.registry.pools.items()
        if tenant.may_use(name)
    ]
    default = models[0]["name"] if models else None
    return web.json_response({"models": models, "default_model": default})
