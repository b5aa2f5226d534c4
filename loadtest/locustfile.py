"""Locust scenarios for the gateway: shared system prompts, multi-turn sessions, long-context RAG.

Every request streams a chat completion and this file parses the SSE stream itself, so it can
report what a user feels rather than what Locust's request timer sees (which, for a stream, stops
at the response headers). Per request it fires custom events: `TTFT` (time to the first
non-empty content delta), `ITL` (one per gap between consecutive content deltas) and `E2E`
(request to `data: [DONE]`), each named after the scenario; Locust's CSV and HTML reports then
carry their percentiles. A stream that ends without `[DONE]`, or with an error event, is a
failure. At the end it prints the share of prompt tokens the workers served from their prefix
cache (`usage.prompt_tokens_details.cached_tokens`), the number prefix routing exists to raise.

Run it with `make loadtest` (headless, against `prefix-router demo`), or by hand:
`locust -f loadtest/locustfile.py --host http://127.0.0.1:8080`. Environment: `LOADTEST_MODEL`
(default `demo-llm`), `LOADTEST_MAX_TOKENS` (32), `LOADTEST_API_KEY` (sent as a bearer token).
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from locust import HttpUser, between, events

MODEL = os.environ.get("LOADTEST_MODEL", "demo-llm")
MAX_TOKENS = int(os.environ.get("LOADTEST_MAX_TOKENS", "32"))
API_KEY = os.environ.get("LOADTEST_API_KEY", "")
CHAT_PATH = "/v1/chat/completions"

_SYLLABLES = ("ka", "lo", "mi", "ren", "tu", "sa", "vor", "pe", "dri", "on", "qua", "zel")


def _text(rng: random.Random, words: int) -> str:
    """Deterministic filler prose; the simulated worker counts one token per word."""
    return " ".join(
        "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(words)
    )


_CORPUS_RNG = random.Random(20240611)
# Four assistants' system prompts (~600 tokens each) that many users share.
SYSTEM_PROMPTS = tuple(
    f"You are assistant #{i}. Follow these instructions. " + _text(_CORPUS_RNG, 600)
    for i in range(4)
)
# A small document store; retrieval favours popular documents, so contexts overlap.
DOCUMENTS = tuple(f"Document {i}: " + _text(_CORPUS_RNG, 1000) for i in range(12))
DOCUMENT_WEIGHTS = tuple(1.0 / (rank + 1) for rank in range(len(DOCUMENTS)))


@dataclass
class StreamResult:
    """What one streamed answer looked like from the client's side (times in seconds)."""

    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    text: str = ""
    done: bool = False
    error: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


def _apply_event(result: StreamResult, data: str, now_s: float, start_s: float) -> float | None:
    """Fold one SSE `data:` payload into `result`; returns the arrival time if it had content."""
    if data == "[DONE]":
        result.done = True
        return None
    try:
        chunk = json.loads(data)
    except json.JSONDecodeError:
        result.error = f"unparseable event: {data[:80]!r}"
        return None
    if "error" in chunk:
        result.error = str(chunk["error"].get("message", chunk["error"]))
        return None
    usage = chunk.get("usage") or {}
    if usage:
        result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        result.completion_tokens = int(usage.get("completion_tokens") or 0)
        details = usage.get("prompt_tokens_details") or {}
        result.cached_tokens = int(details.get("cached_tokens") or 0)
    for choice in chunk.get("choices") or ():
        content = (choice.get("delta") or {}).get("content")
        if content:
            result.text += content
            if result.ttft_s is None:
                result.ttft_s = now_s - start_s
            return now_s
    return None


def read_stream(chunks: Iterable[bytes], start_s: float) -> StreamResult:
    """Parse an OpenAI SSE body as it arrives, timing each content delta on arrival."""
    result = StreamResult()
    buffer = b""
    last_content_s: float | None = None
    for chunk in chunks:
        now_s = time.perf_counter()
        buffer += chunk.replace(b"\r\n", b"\n")
        *events_raw, buffer = buffer.split(b"\n\n")
        for raw in events_raw:
            for line in raw.decode("utf-8", errors="replace").split("\n"):
                if not line.startswith("data:"):
                    continue
                arrived = _apply_event(result, line[5:].strip(), now_s, start_s)
                if arrived is not None:
                    if last_content_s is not None:
                        result.itl_s.append(arrived - last_content_s)
                    last_content_s = arrived
        if result.done or result.error:
            break
    return result


@dataclass
class TokenTotals:
    """Prompt and cached tokens over the whole run (Locust users run in greenlets)."""

    prompt: int = 0
    cached: int = 0
    completion: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, result: StreamResult) -> None:
        with self.lock:
            self.prompt += result.prompt_tokens
            self.cached += result.cached_tokens
            self.completion += result.completion_tokens


TOTALS = TokenTotals()


# Locust's EventHook methods are unannotated (and the whole package is Any where locust is not
# installed): calling them through Any keeps mypy --strict quiet in both cases.
_REQUEST_HOOK: Any = events.request
_QUITTING_HOOK: Any = events.quitting


def _fire(request_type: str, name: str, seconds: float, length: int = 0) -> None:
    _REQUEST_HOOK.fire(
        request_type=request_type,
        name=name,
        response_time=seconds * 1000.0,
        response_length=length,
        exception=None,
        context={},
    )


def _print_cache_summary(**_: Any) -> None:
    share = TOTALS.cached / TOTALS.prompt if TOTALS.prompt else 0.0
    print(
        f"prompt tokens: {TOTALS.prompt}, served from prefix cache: {TOTALS.cached} "
        f"({share:.1%}); completion tokens: {TOTALS.completion}",
        flush=True,
    )


_QUITTING_HOOK.add_listener(_print_cache_summary)


# Where locust is not installed mypy sees HttpUser as Any (it is in ignore_missing_imports), and
# subclassing Any is an error under --strict; subclassing is the only way to declare a Locust
# user. Recent locust ships py.typed, hence `unused-ignore` too: the file checks either way.
class StreamingChatUser(HttpUser):  # type: ignore[misc, unused-ignore]
    """Base of the scenarios: one streamed chat completion, measured from the client's side."""

    abstract = True
    wait_time = between(0.2, 1.0)

    def stream_chat(
        self, scenario: str, messages: list[dict[str, str]], session_id: str | None = None
    ) -> StreamResult | None:
        body: dict[str, Any] = {
            "model": MODEL,
            "messages": messages,
            "max_tokens": MAX_TOKENS,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        # Compressed SSE would be buffered and distort TTFT: ask for the raw stream.
        headers = {"Accept": "text/event-stream", "Accept-Encoding": "identity"}
        if API_KEY:
            headers["Authorization"] = f"Bearer {API_KEY}"
        if session_id:
            headers["X-Session-Id"] = session_id
        start_s = time.perf_counter()
        with self.client.post(
            CHAT_PATH, json=body, headers=headers, name=scenario, stream=True, catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return None
            result = read_stream(response.iter_content(chunk_size=None), start_s)
            if result.error or not result.done:
                response.failure(result.error or "stream ended without [DONE]")
                return None
            response.success()
        if result.ttft_s is not None:
            _fire("TTFT", scenario, result.ttft_s)
        for gap_s in result.itl_s:
            _fire("ITL", scenario, gap_s)
        _fire("E2E", scenario, time.perf_counter() - start_s, result.completion_tokens)
        TOTALS.add(result)
        return result


class SharedSystemPromptUser(StreamingChatUser):
    """Many users, four long system prompts, a short new question each time."""

    weight = 3

    def ask(self) -> None:
        rng = random.Random()
        messages = [
            {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)},
            {"role": "user", "content": "Question: " + _text(rng, rng.randint(10, 40))},
        ]
        self.stream_chat("shared-prompt chat", messages)

    tasks = [ask]


class MultiTurnSessionUser(StreamingChatUser):
    """A conversation that grows turn by turn; each turn extends the previous prompt."""

    weight = 2
    max_turns = 6

    def on_start(self) -> None:
        self._new_session()

    def _new_session(self) -> None:
        rng = random.Random()
        self.session_id = uuid.uuid4().hex
        self.history: list[dict[str, str]] = [
            {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}
        ]

    def turn(self) -> None:
        if len(self.history) > 2 * self.max_turns:
            self._new_session()
        rng = random.Random()
        self.history.append({"role": "user", "content": _text(rng, rng.randint(20, 80))})
        result = self.stream_chat("multi-turn session", list(self.history), self.session_id)
        if result is None:
            self._new_session()  # a failed turn ends the conversation, as a real user would
            return
        self.history.append({"role": "assistant", "content": result.text})

    tasks = [turn]


class LongContextRagUser(StreamingChatUser):
    """Retrieval-augmented questions: three ~1000-token documents, popular ones more often."""

    weight = 1

    def ask(self) -> None:
        rng = random.Random()
        chosen: list[str] = []
        while len(chosen) < 3:
            document = rng.choices(DOCUMENTS, weights=DOCUMENT_WEIGHTS)[0]
            if document not in chosen:
                chosen.append(document)
        context = "\n\n".join(sorted(chosen))  # retrieval order is by document id
        messages = [
            {"role": "system", "content": "Answer from the context only.\n\n" + context},
            {"role": "user", "content": "Question: " + _text(rng, rng.randint(8, 20))},
        ]
        self.stream_chat("long-context RAG", messages)

    tasks = [ask]
