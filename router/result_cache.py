"""Result cache for exact repeats of deterministic requests.

Only requests whose answer cannot vary are cached: temperature 0 or a fixed seed, one choice.
Entries are keyed per tenant (one tenant never sees another's answer) by a digest of the
request body without its delivery options (stream, stream_options, user), so a streamed and a
non-streamed request share an entry. An entry stores the answer normalized (text, finish
reason, usage); a hit is rendered in the shape the client asked for, as a JSON body or as a
valid SSE stream ending with `[DONE]`.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from router.state.backend import StateBackend
from router.state.keys import Keys

_DELIVERY_FIELDS = ("stream", "stream_options", "user")


def is_deterministic(body: dict[str, Any]) -> bool:
    n = body.get("n")
    if n not in (None, 1):
        return False
    seed = body.get("seed")
    temperature = body.get("temperature")
    return (isinstance(seed, int) and not isinstance(seed, bool)) or temperature == 0


def cache_digest(pool: str, kind: str, body: dict[str, Any]) -> str:
    material = {k: v for k, v in body.items() if k not in _DELIVERY_FIELDS}
    material["model"] = pool
    text = json.dumps([kind, material], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Capture:
    """Collects the events of a streamed answer as they are relayed (an identity transform)."""

    parts: list[bytes] = field(default_factory=list)

    def wrap(self, inner: Callable[[bytes], bytes] | None) -> Callable[[bytes], bytes]:
        def record(data: bytes) -> bytes:
            self.parts.append(data)
            return inner(data) if inner is not None else data

        return record

    def entry_from_stream(self, kind: str) -> dict[str, Any] | None:
        text: list[str] = []
        finish: str | None = None
        usage: Any = None
        for event in b"".join(self.parts).split(b"\n\n"):
            if not event.startswith(b"data: {"):
                continue
            try:
                payload = json.loads(event[6:])
            except ValueError:
                return None
            if isinstance(payload.get("usage"), dict):
                usage = payload["usage"]
            for choice in payload.get("choices") or []:
                piece = (
                    (choice.get("delta") or {}).get("content")
                    if kind == "chat"
                    else choice.get("text")
                )
                if isinstance(piece, str):
                    text.append(piece)
                finish = choice.get("finish_reason") or finish
        return {"text": "".join(text), "finish_reason": finish, "usage": usage}


def entry_from_body(kind: str, body: bytes) -> dict[str, Any] | None:
    try:
        payload = json.loads(body)
        choice = payload["choices"][0]
        text = choice["message"]["content"] if kind == "chat" else choice["text"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return {
        "text": text,
        "finish_reason": choice.get("finish_reason"),
        "usage": payload.get("usage"),
    }


class ResultCache:
    def __init__(self, backend: StateBackend, keys: Keys) -> None:
        self._backend = backend
        self._keys = keys

    async def get(self, tenant: str, digest: str) -> dict[str, Any] | None:
        raw = await self._backend.cache_get(self._keys.result_cache(tenant, digest))
        if raw is None:
            return None
        try:
            entry = json.loads(raw)
        except ValueError:
            return None
        return entry if isinstance(entry, dict) else None

    async def put(
        self, tenant: str, digest: str, entry: dict[str, Any], ttl_s: float, max_bytes: int
    ) -> None:
        raw = json.dumps(entry).encode()
        if len(raw) <= max_bytes:
            await self._backend.cache_set(self._keys.result_cache(tenant, digest), raw, ttl_s)


def _completion_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def render_body(kind: str, model: str, entry: dict[str, Any]) -> dict[str, Any]:
    created = int(time.time())
    if kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": entry["text"]},
            "finish_reason": entry.get("finish_reason"),
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": entry["text"], "finish_reason": entry.get("finish_reason")}
        obj = "text_completion"
    body: dict[str, Any] = {
        "id": _completion_id(kind),
        "object": obj,
        "created": created,
        "model": model,
        "choices": [choice],
    }
    if entry.get("usage") is not None:
        body["usage"] = entry["usage"]
    return body


def render_stream(kind: str, model: str, entry: dict[str, Any], with_usage: bool) -> bytes:
    ident, created = _completion_id(kind), int(time.time())
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        payload = {
            "id": ident,
            "object": obj,
            "created": created,
            "model": model,
            "choices": choices,
            **extra,
        }
        return b"data: " + json.dumps(payload).encode() + b"\n\n"

    text, finish = entry["text"], entry.get("finish_reason")
    if kind == "chat":
        parts = [
            event(
                [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": text},
                        "finish_reason": None,
                    }
                ]
            ),
            event([{"index": 0, "delta": {}, "finish_reason": finish}]),
        ]
    else:
        parts = [
            event([{"index": 0, "text": text, "finish_reason": None}]),
            event([{"index": 0, "text": "", "finish_reason": finish}]),
        ]
    if with_usage and entry.get("usage") is not None:
        parts.append(event([], usage=entry["usage"]))
    parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)
