"""Reading SSE streams in tests."""

from __future__ import annotations

import json
from typing import Any

import aiohttp


async def read_events(resp: aiohttp.ClientResponse) -> tuple[list[Any], bool]:
    """All `data:` payloads of a stream (JSON-decoded) and whether `[DONE]` ended it."""
    raw = (await resp.read()).decode()
    events: list[Any] = []
    done = False
    for block in raw.split("\n\n"):
        block = block.strip()
        if not block.startswith("data: "):
            continue
        data = block[len("data: ") :]
        if data == "[DONE]":
            done = True
            continue
        events.append(json.loads(data))
    return events, done
