"""vLLM's OpenAI wire format as the simulated worker speaks it: parsing, SSE chunks, errors.

Requests are parsed as leniently as vLLM parses them (unknown fields ignored, ``model`` optional)
and turned into token ids with the configured tokenizer (the word tokenizer unless a real one is
configured). Responses follow ``reference/vllm-interface.md``
§4.2-4.4 byte for byte where a client could tell the difference. Streaming is the hot path of the
gateway benchmarks, so a request's chunk envelope is encoded once into a bytes prefix and suffix
and every token chunk is three concatenated byte strings; generated words are plain ASCII, so they
never need escaping. ``usage`` always carries ``prompt_tokens_details.cached_tokens``, as if vLLM
ran with ``--enable-prompt-tokens-details`` (DESIGN §10.3).
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

from router.vllm_wire.block_hash import LoraKey
from workers.sim.config import SimConfig
from workers.sim.tokenizer import OUTPUT_WORDS, PromptError, PromptTokenizer

Kind = Literal["chat", "completion"]

# Output vocabulary as streamed (leading space) and as token ids (what the tokenizer would say).
WORD_TEXT: tuple[str, ...] = tuple(" " + w for w in OUTPUT_WORDS)
WORD_BYTES: tuple[bytes, ...] = tuple(w.encode("ascii") for w in WORD_TEXT)
WORD_IDS: tuple[int, ...] = tuple(zlib.crc32(w.encode("utf-8")) for w in OUTPUT_WORDS)

DONE_EVENT = b"data: [DONE]\n\n"
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}


class SimAPIError(Exception):
    """An error the client sees as vLLM's ``ErrorResponse``; ``code`` is the HTTP status."""

    def __init__(self, status: int, message: str, error_type: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.status,
            }
        }

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status)


def bad_request(message: str, param: str | None = None) -> SimAPIError:
    return SimAPIError(400, message, "BadRequestError", param)


@dataclass(slots=True)
class ParsedRequest:
    kind: Kind
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    stream: bool
    include_usage: bool
    cache_salt: str | None
    lora: LoraKey | None = None
    """The adapter the request's `model` names (None: the base model)."""
    kv_transfer: Any = None
    """Its `kv_transfer_params` (P/D disaggregation), as sent."""


def _max_tokens(body: Mapping[str, Any], kind: Kind, default: int) -> int:
    value = body.get("max_completion_tokens") if kind == "chat" else None
    param = "max_completion_tokens"
    if value is None:
        value, param = body.get("max_tokens"), "max_tokens"
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad_request(f"{param} must be an integer >= 1, got {value!r}", param)
    return value


def parse_request(
    raw: bytes,
    kind: Kind,
    config: SimConfig,
    tokenizer: PromptTokenizer,
    header_request_id: str | None,
    adapters: Mapping[str, str] | None = None,
) -> ParsedRequest:
    """Validate a completions or chat body and tokenize its prompt; raises ``SimAPIError``.

    `model` may name the base model or one of `adapters` (LoRA name -> path)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"Invalid JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("Request body must be a JSON object")
    model = body.get("model")
    lora: LoraKey | None = None
    if model is not None and model != config.model:
        path = adapters.get(model) if adapters is not None and isinstance(model, str) else None
        if path is None:
            raise SimAPIError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        lora = (model, path)
    try:
        prompt_ids = tokenizer.request_ids(body, chat=kind == "chat")
    except PromptError as exc:
        raise bad_request(str(exc), "messages" if kind == "chat" else "prompt") from None
    if not prompt_ids:
        raise bad_request("The decoder prompt cannot be empty", "prompt")
    max_tokens = _max_tokens(body, kind, config.default_max_tokens)
    n_prompt = len(prompt_ids)
    limit = config.max_model_len
    if n_prompt >= limit:
        raise bad_request(
            f"This model's maximum context length is {limit} tokens. However, your request has "
            f"{n_prompt} input tokens. Please reduce the length of the input messages."
        )
    if n_prompt + max_tokens > limit:
        raise bad_request(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{n_prompt + max_tokens} tokens ({n_prompt} in the messages, {max_tokens} in the "
            f"completion). Please reduce the length of the messages or completion.",
        )
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise bad_request("cache_salt must be a non-empty string", "cache_salt")
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
    rid = header_request_id or body.get("request_id")
    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    request_id = prefix + (rid if isinstance(rid, str) and rid else os.urandom(8).hex())
    return ParsedRequest(
        kind,
        request_id,
        prompt_ids,
        max_tokens,
        bool(body.get("stream")),
        include_usage,
        salt,
        lora,
        body.get("kv_transfer_params"),
    )


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


class StreamEncoder:
    """Pre-encoded SSE envelopes of one streamed response."""

    __slots__ = ("_head", "_last_tail", "_open", "_tail", "kind")

    def __init__(self, kind: Kind, request_id: str, created: int, model: str) -> None:
        self.kind = kind
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        self._head = (
            f'data: {{"id":{json.dumps(request_id)},"object":"{obj}","created":{created},'
            f'"model":{json.dumps(model)},'
        ).encode()
        if kind == "chat":
            self._open = self._head + b'"choices":[{"index":0,"delta":{"content":"'
            self._tail = b'"},"logprobs":null,"finish_reason":null}]}\n\n'
            self._last_tail = (
                b'"},"logprobs":null,"finish_reason":"length","stop_reason":null}]}\n\n'
            )
        else:
            self._open = self._head + b'"choices":[{"index":0,"text":"'
            self._tail = b'","logprobs":null,"finish_reason":null,"stop_reason":null}]}\n\n'
            self._last_tail = (
                b'","logprobs":null,"finish_reason":"length","stop_reason":null}]}\n\n'
            )

    def role_chunk(self) -> bytes:
        return (
            self._head
            + b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
            + b'"logprobs":null,"finish_reason":null}]}\n\n'
        )

    def token_chunk(self, word: bytes, last: bool) -> bytes:
        return self._open + word + (self._last_tail if last else self._tail)

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> bytes:
        usage = json.dumps(
            usage_dict(prompt_tokens, completion_tokens, cached_tokens), separators=(",", ":")
        )
        return self._head + b'"choices":[],"usage":' + usage.encode() + b"}\n\n"

    def error_chunk(self, error: SimAPIError) -> bytes:
        return b"data: " + json.dumps(error.body(), separators=(",", ":")).encode() + b"\n\n"


def full_response(
    parsed: ParsedRequest,
    created: int,
    model: str,
    text: str,
    completion_tokens: int,
    cached_tokens: int,
) -> dict[str, Any]:
    """The non-streamed body of a finished request."""
    choice: dict[str, Any]
    if parsed.kind == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "tool_calls": []},
            "logprobs": None,
            "finish_reason": "length",
            "stop_reason": None,
        }
        obj = "chat.completion"
    else:
        choice = {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": "length",
            "stop_reason": None,
        }
        obj = "text_completion"
    return {
        "id": parsed.request_id,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage_dict(len(parsed.prompt_ids), completion_tokens, cached_tokens),
    }


async def json_object(request: web.Request) -> dict[str, Any]:
    """A small control request's JSON object body ({} when it is not one)."""
    try:
        body = await request.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
