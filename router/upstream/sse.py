"""Server-sent-event framing helpers for the relay: event boundaries and usage extraction.

The relay forwards upstream bytes as they come, but only up to the last complete event, so an
error event written after a broken stream never lands inside a half-written one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

DONE = b"data: [DONE]\n\n"
EVENT_END = b"\n\n"


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cached_reported: bool = False
    """Whether `cached_tokens` was a number: vLLM sends null both for 0 and when it runs
    without `--enable-prompt-tokens-details`."""


def _as_int(value: Any) -> int:
    return value if type(value) is int else 0  # never a bool, a float or a string


def usage_from(payload: Any) -> Usage | None:
    """Read an OpenAI `usage` object (with vLLM's `prompt_tokens_details.cached_tokens`)."""
    if not isinstance(payload, dict):
        return None
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else 0
    return Usage(
        _as_int(usage.get("prompt_tokens")),
        _as_int(usage.get("completion_tokens")),
        _as_int(cached),
        type(cached) is int,
    )


def patch_cached(payload: Any, cached_tokens: int) -> bool:
    """Set a payload's `usage.prompt_tokens_details.cached_tokens`; False if it has no usage."""
    usage = payload.get("usage") if isinstance(payload, dict) else None
    if not isinstance(usage, dict):
        return False
    usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return True


def split_usage_event(
    events: bytes, drop: bool, cached_tokens: int | None = None, at: int | None = None
) -> tuple[bytes, Usage | None, bool]:
    """Find a usage-only event (`"choices": []` plus `usage`) among complete events.

    Returns the events (without that usage event when `drop`: the client did not ask for it),
    the usage, and whether `[DONE]` was seen. A `cached_tokens` given replaces the usage's
    (a P/D decode step reports the prefill's count).
    Only called on chunks that mention "usage", so the common path never parses JSON; when
    one event does (vLLM's last, without continuous usage stats), only that one is parsed, and
    the events around it are not split. `at`: where the caller found the first `"usage"`.
    """
    if at is None:
        at = events.find(b'"usage"')
    if at >= 0 and events.find(b'"usage"', at + 7) < 0:
        cut = events.rfind(EVENT_END, 0, at)
        start = cut + 2 if cut >= 0 else 0
        end = events.find(EVENT_END, at)
        if end >= 0:
            event, usage = _usage_event(events[start:end], drop, cached_tokens)
            end += 2
            if event is None:
                out = events[:start] + events[end:]
            elif cached_tokens is None:
                out = events  # the event unchanged
            else:
                out = events[:start] + event + EVENT_END + events[end:]
            # `DONE in events`, searched from the usage event first: [DONE] ends the stream, so
            # it is almost always right behind it.
            done = events.find(DONE, start) >= 0 or events.find(DONE, 0, start) >= 0
            return out, usage, done
    return _split_events(events, drop, cached_tokens)


_DECODER = json.JSONDecoder()


def _json_object(data: bytes) -> Any:
    """`json.loads` of one event's UTF-8 data, without its encoding sniffing and wrappers (half
    of its cost on a usage event); ValueError as it."""
    text = data.decode()
    payload, end = _DECODER.raw_decode(text)
    if end != len(text) and text[end:].strip():
        raise ValueError("extra data after the JSON value")
    return payload


def _usage_event(
    event: bytes, drop: bool, cached_tokens: int | None
) -> tuple[bytes | None, Usage | None]:
    """One event (without its blank line): as it goes on (None: dropped), and its usage."""
    if not event.startswith(b"data: {") or b'"usage"' not in event:
        return event, None
    try:
        payload = _json_object(event[6:])
    except ValueError:
        return event, None
    if cached_tokens is not None and patch_cached(payload, cached_tokens):
        event = b"data: " + json.dumps(payload, separators=(",", ":")).encode()
    usage = usage_from(payload)
    if usage is not None and drop and payload.get("choices") == []:
        return None, usage
    return event, usage


def _split_events(
    events: bytes, drop: bool, cached_tokens: int | None
) -> tuple[bytes, Usage | None, bool]:
    kept: list[bytes] = []
    usage: Usage | None = None
    for event in events.split(EVENT_END):
        if not event:
            continue
        passed, found = _usage_event(event, drop, cached_tokens)
        if found is not None:
            usage = found
        if passed is not None:
            kept.append(passed)
    out = EVENT_END.join(kept) + EVENT_END if kept else b""
    return out, usage, DONE in events


def error_event(message: str, error_type: str, code: str) -> bytes:
    body = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    return b"data: " + json.dumps(body).encode() + EVENT_END
