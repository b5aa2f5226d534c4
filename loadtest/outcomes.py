"""How a benchmark classifies one streamed answer: whole, ended by an error event, or cut short.

A stream that ends without `[DONE]` and without an error event is a silent truncation: the
client would take a cut answer for a whole one, the one outcome a gateway must never produce.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp

SILENT_TRUNCATION = "SILENT_TRUNCATION"


def error_code(payload: bytes) -> str:
    """The `error.code` of an OpenAI error body or event payload ("unparsed" if none)."""
    try:
        return str(json.loads(payload)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "unparsed"


def stream_outcome(raw: bytes) -> str:
    """`ok`, `error_event:<code>` or SILENT_TRUNCATION, from the stream's last event."""
    tail = raw.rstrip().rsplit(b"\n", 1)[-1]
    if tail == b"data: [DONE]":
        return "ok"
    if tail.startswith(b"data: {") and b'"error"' in tail:
        return f"error_event:{error_code(tail[6:])}"
    return SILENT_TRUNCATION


async def chat_outcome(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> str:
    """Send one chat request and classify what came back: `http_<status>:<code>`,
    `client:<error>` (nothing came), or for a stream its `stream_outcome` (else `ok`)."""
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            raw = await resp.read()
            if resp.status != 200:
                return f"http_{resp.status}:{error_code(raw)}"
    except (aiohttp.ClientError, TimeoutError) as exc:
        return f"client:{type(exc).__name__}"
    return stream_outcome(raw) if body.get("stream") else "ok"
