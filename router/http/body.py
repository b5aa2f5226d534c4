"""Reading and checking OpenAI request bodies before anything is routed.

Checks are cheap and structural: size, JSON validity and nesting depth, and the types of the
fields the gateway itself reads. Everything else passes upstream untouched.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from aiohttp import web

from router.errors import InvalidRequest, PayloadTooLarge

Kind = Literal["chat", "completions"]


def too_large(max_bytes: int, length: int | None = None) -> PayloadTooLarge:
    """The 413 of a body over `max_bytes` (`length`: as its Content-Length announced)."""
    if length is not None:
        return PayloadTooLarge(f"request body of {length} bytes is over the {max_bytes} limit")
    return PayloadTooLarge(f"request body is over the {max_bytes} byte limit")


async def read_body(request: web.Request, max_bytes: int) -> bytes:
    length = request.content_length
    if length is not None and length > max_bytes:
        raise too_large(max_bytes, length)
    # `read(n)` returns what has arrived so far, not n bytes: a body that comes in several
    # segments (any large prompt over a real network) is read until its end.
    parts: list[bytes] = []
    size = 0
    try:
        while chunk := await request.content.read(max_bytes + 1 - size):
            parts.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise too_large(max_bytes)
    except ConnectionError as exc:
        raise InvalidRequest(f"could not read the request body: {exc}") from None
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _depth_ok(value: Any, limit: int) -> bool:
    """No container nested deeper than `limit` (the value itself is level 1). One level at a
    time, exact types (json.loads makes only dict and list): 0.6 us for a chat body, where a
    stack of (node, depth) pairs took 2.3."""
    level: list[Any] = [value]
    depth = 1
    while level:
        if depth > limit:
            return False
        deeper: list[Any] = []
        for node in level:
            for child in node.values() if type(node) is dict else node:
                if type(child) is dict or type(child) is list:
                    deeper.append(child)
        level = deeper
        depth += 1
    return True


def parse_json_object(body: bytes, max_depth: int) -> dict[str, Any]:
    if not body:
        raise InvalidRequest("the request body is empty; send a JSON object")
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        raise InvalidRequest("the request body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise InvalidRequest("the request body must be a JSON object")
    if not _depth_ok(payload, max_depth):
        raise InvalidRequest(f"the request body nests deeper than {max_depth} levels")
    return payload


def _opt_int(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequest(f"`{name}` must be an integer", param=name)
    if not low <= value <= high:
        raise InvalidRequest(f"`{name}` must be between {low} and {high}", param=name)
    return value


def require_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("`model` is required and must be a string", param="model")
    return model


def check_fields(body: dict[str, Any], kind: Kind, max_tokens_limit: int) -> int | None:
    """Validate the fields the gateway reads; return the requested max tokens, if any."""
    require_model(body)
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("`messages` must be a non-empty list", param="messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise InvalidRequest(
                    f"`messages[{i}]` must be an object with a string `role`",
                    param=f"messages[{i}]",
                )
            content = message.get("content")
            if content is not None and not isinstance(content, str | list):
                raise InvalidRequest(
                    f"`messages[{i}].content` must be a string or a list of parts",
                    param=f"messages[{i}].content",
                )
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str | list):
            raise InvalidRequest("`prompt` is required: a string or a list", param="prompt")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("`stream` must be a boolean", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest("`stream_options` must be an object", param="stream_options")
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)):
            raise InvalidRequest(f"`{name}` must be a number", param=name)
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not 1 <= len(salt) <= 1024):
        raise InvalidRequest(
            "`cache_salt` must be a non-empty string of at most 1024 characters",
            param="cache_salt",
        )
    _opt_int(body, "n", 1, 16)
    tokens = _opt_int(body, "max_tokens", 1, max_tokens_limit)
    completion = _opt_int(body, "max_completion_tokens", 1, max_tokens_limit)
    return completion if completion is not None else tokens
