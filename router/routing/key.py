"""The routing key: the text a worker will tokenize, in the order it will see it.

Prefix routing only works if the key of a conversation's next turn *extends* the key of the
previous turn, so the key covers everything the chat template renders before generation: the
tools first (templates put them in the system prompt), then every message's role and content in
order, including assistant tool calls and tool results. Keys built from the first or last
message alone are a known failure of other routers (routing-landscape §8.6). The key is an
approximation of the rendered prompt, never sent anywhere; it only has to be deterministic and
prefix-preserving. The gateway validates field types before calling here, but nothing in this
module raises on odd-but-valid input: unknown shapes fall back to stable placeholders.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from router.domain.calibration import CHARS_PER_TOKEN

# Separators that never occur in ordinary text, so "role + content" boundaries are unambiguous
# and a message's rendering cannot be confused with the start of the next one.
_FIELD = "\x1f"
_MESSAGE = "\x1e"


def routing_key(body: Mapping[str, Any], kind: Literal["chat", "completions"]) -> str:
    """Build the routing key of an OpenAI request body."""
    if kind == "completions":
        return _prompt_text(body.get("prompt"))
    parts: list[str] = []
    tools = body.get("tools")
    if tools:
        parts.append("tools" + _FIELD + _stable_json(tools) + _MESSAGE)
    messages = body.get("messages")
    if isinstance(messages, list):
        parts.extend(_message_text(m) for m in messages)
    return "".join(parts)


def cache_partition(body: Mapping[str, Any], adapter: str | None) -> str:
    """The prefix-cache partition of a request: the LoRA adapter it names and its
    `cache_salt`, the two things vLLM mixes into block hashes besides the tokens (so a prefix
    cached under one partition is a miss under any other); "" for neither."""
    salt = body.get("cache_salt")
    if adapter is None and not isinstance(salt, str):
        return ""
    return f"{adapter or ''}{_FIELD}{salt if isinstance(salt, str) else ''}"


def extend_key(key: str, answer: str, chat: bool) -> str:
    """The key of a prompt followed by its answer: what the next turn's key starts with."""
    if chat:
        return key + _message_text({"role": "assistant", "content": answer})
    return key + answer


def estimate_prompt_tokens(key: str) -> int:
    """A cheap estimate of prompt tokens (~4 characters each), at least 1."""
    return max(1, len(key) // CHARS_PER_TOKEN)


def _message_text(message: Any) -> str:
    if not isinstance(message, Mapping):
        return "?" + _FIELD + _stable_json(message) + _MESSAGE
    out = [str(message.get("role", "")), _FIELD]
    name = message.get("name")
    if name is not None:
        out += ["name=", str(name), _FIELD]
    out.append(_content_text(message.get("content")))
    tool_calls = message.get("tool_calls")
    if tool_calls:
        out += [_FIELD, "tool_calls=", _stable_json(tool_calls)]
    tool_call_id = message.get("tool_call_id")
    if tool_call_id is not None:
        out += [_FIELD, "tool_call_id=", str(tool_call_id)]
    out.append(_MESSAGE)
    return "".join(out)


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(_part_text(p) for p in content)
    return _stable_json(content)


def _part_text(part: Any) -> str:
    if isinstance(part, str):
        return part
    if isinstance(part, Mapping):
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            return str(part["text"])
        # Images, audio and files: a placeholder that still distinguishes one attachment from
        # another (same URL, same key), without putting megabytes of base64 into the key.
        ref = _stable_json(part)
        if len(ref) > 256:
            ref = ref[:128] + "..." + str(len(ref))
        return f"<{kind}:{ref}>"
    return _stable_json(part)


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        if not prompt:
            return ""
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            # Token ids: one short decimal per id keeps the prefix property of the id list.
            return " ".join(map(str, prompt))
        # A batch of prompts: route on the first, the one the worker sees first.
        return _prompt_text(prompt[0])
    if prompt is None:
        return ""
    return _stable_json(prompt)


def _stable_json(value: Any) -> str:
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        # Only reachable with non-JSON values (the gateway passes parsed JSON); stay total.
        return repr(value)
