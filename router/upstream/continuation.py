"""Continuing a stream whose worker broke: what the client has, what to ask next, and the seam.

A `Transcript` follows what the client received of a stream (the text, the tokens, the stream's
`id`, `created` and `model`), by regular expressions over the events, never a JSON parse.
`continuation_body` turns the original request and the transcript into the request that asks
another worker for the rest: for `/v1/chat/completions` the messages plus one assistant message
holding the partial answer, with vLLM's `continue_final_message: true` and
`add_generation_prompt: false`; for `/v1/completions` the prompt followed by the text; token
limits reduced by what was sent (no limit stays no limit). `SeamRewriter` makes the rest read as
the same stream: the original's identity in every chunk, no second role chunk, and usage counted
for the whole answer (the original prompt, every generated token).
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from router.upstream.answer import AnswerBytes

Kind = Literal["chat", "completions"]

_ID = re.compile(rb'"id":"([^"\\]*(?:\\.[^"\\]*)*)"')
_CREATED = re.compile(rb'"created":(\d+)')
_MODEL = re.compile(rb'"model":"([^"\\]*(?:\\.[^"\\]*)*)"')
_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")


def refusal(body: dict[str, Any], kind: Kind) -> str | None:
    """Why a stream of this request cannot be continued faithfully (None: it can)."""
    n = body.get("n")
    if n not in (None, 1):
        return "n"
    if body.get("best_of") not in (None, 1):
        return "best_of"
    if body.get("echo"):
        return "echo"
    if body.get("logprobs") or body.get("top_logprobs"):
        return "logprobs"
    fmt = body.get("response_format")
    if any(body.get(k) is not None for k in _GUIDED) or (
        isinstance(fmt, dict) and fmt.get("type") not in (None, "text")
    ):
        return "structured_output"
    if kind == "completions" and not isinstance(body.get("prompt"), str):
        return "prompt_shape"
    if kind == "chat" and not isinstance(body.get("messages"), list):
        return "prompt_shape"
    return None


class Transcript:
    """What the client received of one stream, over every segment."""

    __slots__ = ("_text", "identity", "tool_calls")

    def __init__(self, kind: Kind) -> None:
        self._text = AnswerBytes(chat=kind == "chat")
        self.tool_calls = False
        self.identity: tuple[bytes, bytes, bytes] | None = None
        """The stream's id, created and model, as the first event gave them (JSON-escaped)."""

    def add(self, data: bytes) -> None:
        if self.identity is None:
            found = (_ID.search(data), _CREATED.search(data), _MODEL.search(data))
            id_, created, model = found
            if id_ is not None and created is not None and model is not None:
                self.identity = (id_.group(1), created.group(1), model.group(1))
        self._text.add(data)
        if not self.tool_calls and b'"tool_calls"' in data:
            self.tool_calls = True

    @property
    def tokens(self) -> int:
        """Events that carried text: vLLM streams one per generated token."""
        return self._text.tokens

    def text(self) -> str | None:
        return self._text.text()


def _reduced(body: dict[str, Any], field: str, sent: int) -> None:
    value = body.get(field)
    if isinstance(value, int) and not isinstance(value, bool):
        body[field] = max(1 if field != "min_tokens" else 0, value - sent)


def continuation_body(
    body: dict[str, Any], kind: Kind, text: str, sent: int
) -> dict[str, Any] | None:
    """The request for the rest of the answer; None when nothing is left to generate."""
    limits = [body.get(f) for f in ("max_tokens", "max_completion_tokens")]
    if any(isinstance(v, int) and not isinstance(v, bool) and v <= sent for v in limits):
        return None
    rest = dict(body)
    for field in ("max_tokens", "max_completion_tokens", "min_tokens"):
        _reduced(rest, field, sent)
    if kind == "completions":
        rest["prompt"] = body["prompt"] + text
        return rest
    messages = list(body["messages"])
    last = messages[-1] if messages else None
    if (
        body.get("continue_final_message")
        and isinstance(last, dict)
        and isinstance(last.get("content"), str)
    ):
        messages[-1] = {**last, "content": last["content"] + text}  # it was continuing already
    else:
        messages.append({"role": "assistant", "content": text})
    rest["messages"] = messages
    rest["continue_final_message"] = True
    rest["add_generation_prompt"] = False
    return rest


class SeamRewriter:
    """Rewrites a continuation's events to read as the original stream's."""

    __slots__ = ("_identity", "_kind", "_sent")

    def __init__(self, identity: tuple[bytes, bytes, bytes], kind: Kind, sent: int) -> None:
        stream_id, created, model = identity
        self._identity: tuple[str, int, str] = (
            json.loads(b'"' + stream_id + b'"'),
            int(created),
            json.loads(b'"' + model + b'"'),
        )
        self._kind = kind
        self._sent = sent

    def __call__(self, data: bytes) -> bytes:
        out: list[bytes] = []
        for event in data.split(b"\n\n"):
            if not event:
                continue
            if not event.startswith(b"data: {"):
                out.append(event)
                continue
            try:
                payload = json.loads(event[6:])
            except ValueError:
                out.append(event)
                continue
            if self._kind == "chat" and _role_only(payload):
                continue  # the client had the role chunk from the first segment
            payload["id"], payload["created"], payload["model"] = self._identity
            usage = payload.get("usage")
            if isinstance(usage, dict):
                combine_usage(usage, self._sent)
            out.append(b"data: " + json.dumps(payload, separators=(",", ":")).encode())
        return b"".join(e + b"\n\n" for e in out)


def combine_usage(usage: dict[str, Any], sent: int) -> None:
    """A continuation's usage as the whole answer's: its prompt held the `sent` tokens."""
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(prompt, int) and isinstance(completion, int):
        usage["prompt_tokens"] = max(0, prompt - sent)
        usage["completion_tokens"] = completion + sent
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]


def _role_only(payload: Any) -> bool:
    choices = payload.get("choices") if isinstance(payload, dict) else None
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        return False
    delta = choices[0].get("delta")
    return (
        isinstance(delta, dict)
        and "role" in delta
        and not delta.get("content")
        and not delta.get("tool_calls")
        and choices[0].get("finish_reason") is None
    )
