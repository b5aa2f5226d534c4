"""The simulated worker's deterministic word tokenizer and chat template.

Shared by the simulator (``workers.sim``) and the gateway's precise prefix mode, which must compute
exactly the token ids the simulator computes. Without a real model there is no real vocabulary,
but prefix caching only needs token ids that are stable across requests, processes and machines.
So a token is a whitespace-separated word (``str.split()``) and its id is the word's CRC-32, which
is fast and identical everywhere (unlike ``hash()``). The chat template renders each message as
``<|role|>\\n content \\n`` and ends with ``<|assistant|>\\n``; since every piece ends in
whitespace, the prompt of a conversation one turn later (previous messages, the assistant's
answer, a new user message) tokenizes to the previous prompt's tokens followed by the new ones,
which is what makes multi-turn prefix caching work. Generated words are emitted with a leading
space so that the concatenated answer, fed back as the assistant message, re-tokenizes to the
very words that were generated.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

_MAX_CACHED_WORDS = 200_000  # bounds memory against prompts full of unique words
GENERATION_PROMPT = "<|assistant|>\n"

# Output vocabulary: plain lowercase ASCII words, so a token never needs JSON escaping.
# fmt: off
OUTPUT_WORDS: tuple[str, ...] = (
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at",
    "from", "his", "an", "were", "are", "which", "this", "be", "has", "or", "had", "not", "but",
    "first", "one", "their", "its", "new", "after", "who", "they", "have", "her", "she", "two",
    "been", "other", "when", "there", "all", "during", "into", "school", "time", "may", "years",
    "more", "most", "only", "over", "city", "some", "world", "would", "where", "later", "up",
    "such", "used", "many", "can", "state", "about", "national", "out", "known", "university",
    "united", "then", "made", "also", "team", "between", "high", "well", "american", "film",
    "season", "through", "game", "being", "series", "both", "group", "these", "since", "under",
    "three", "number", "part", "several", "river", "year", "while", "against", "early", "album",
    "called", "county", "including", "station", "another", "around", "history", "based", "back",
    "large", "music", "life", "public", "still", "before", "work", "each", "company", "south",
    "north", "west", "east", "small", "long", "right", "population", "second", "following",
    "family", "members", "main", "place", "area", "system", "along", "end", "center", "local",
    "took", "same", "however",
)
# fmt: on


class PromptError(ValueError):
    """The request's messages or prompt cannot be rendered (a 400 for the client)."""


class WordTokenizer:
    """Whitespace tokenizer with a bounded word -> id cache; one per app, never global."""

    __slots__ = ("_ids",)

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}

    def token_id(self, word: str) -> int:
        tid = self._ids.get(word)
        if tid is None:
            if len(self._ids) >= _MAX_CACHED_WORDS:
                self._ids.clear()
            tid = self._ids[word] = zlib.crc32(word.encode("utf-8"))
        return tid

    def encode(self, text: str) -> list[int]:
        ids = self._ids
        get = ids.get
        out: list[int] = []
        append = out.append
        for word in text.split():
            tid = get(word)
            if tid is None:
                tid = self.token_id(word)
            append(tid)
        return out


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping):
                if part.get("type", "text") == "text":
                    parts.append(str(part.get("text", "")))
                else:
                    # Non-text parts (images, audio) still shape the prompt deterministically.
                    parts.append(json.dumps(part, sort_keys=True, separators=(",", ":")))
            else:
                raise PromptError("message content parts must be strings or objects")
        return "\n".join(parts)
    raise PromptError("message content must be a string, a list of parts, or null")


def render_chat(
    messages: Any,
    tools: Sequence[Any] | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """Render a chat request as the text the simulated model sees."""
    if not isinstance(messages, list) or not messages:
        raise PromptError("'messages' must be a non-empty list")
    pieces: list[str] = []
    if tools:
        pieces.append(
            "<|tools|>\n" + json.dumps(tools, sort_keys=True, separators=(",", ":")) + "\n"
        )
    for message in messages:
        if not isinstance(message, Mapping):
            raise PromptError("each message must be an object")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise PromptError("each message needs a string 'role'")
        header = f"<|{role}|>"
        name = message.get("name") or message.get("tool_call_id")
        if isinstance(name, str) and name:
            header += f" {name}"
        body = _content_text(message.get("content"))
        pieces.append(f"{header}\n{body}\n")
        tool_calls = message.get("tool_calls")
        if tool_calls:
            calls = json.dumps(tool_calls, sort_keys=True, separators=(",", ":"))
            pieces.append(f"<|tool_calls|>\n{calls}\n")
    if add_generation_prompt:
        pieces.append(GENERATION_PROMPT)
    return "".join(pieces)
