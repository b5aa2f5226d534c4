"""The generated text of a relayed answer, kept so the prefix index can hold it too.

vLLM caches the KV of generated tokens as well as the prompt's, so the next turn of a
conversation (its history plus this answer) is cached on the worker that answered. The relay
hands each block of complete events it forwarded to `AnswerBytes`, which keeps only the text
(one regular expression over the events instead of a JSON parse per event, up to a bound; longer
answers are not indexed) and decodes it once, when the answer ended.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_ANSWER_BYTES = 256 * 1024
"""Of escaped answer text kept per stream; a longer answer is not indexed."""

# A JSON string value of "content" (chat deltas) or of "text" (completions), escapes included.
# One literal key per pattern, and the escape loop unrolled: the engine jumps from one literal
# to the next instead of trying an alternation at every quote (16 chat events: 3.7 us, against
# 8.2 for `"(?:content|text)":"((?:[^"\\]|\\.)*)"`).
_CHAT_TEXT = re.compile(rb'"content":"([^"\\]*(?:\\.[^"\\]*)*)"')
_COMPLETION_TEXT = re.compile(rb'"text":"([^"\\]*(?:\\.[^"\\]*)*)"')


COMPACT_AT = 64 * 1024
"""Raw event bytes kept before their text is extracted: most answers end below it, so they are
searched once, at the end, not once per relayed block."""


class AnswerBytes:
    """The text pieces of one streamed answer, bounded. The relay hands over blocks of whole
    events; they are kept as they came until COMPACT_AT bytes, then searched in one pass and
    only the (still escaped) text is kept: memory grows with the answer's text, not with its
    event framing, and a short answer costs one search."""

    __slots__ = ("_pieces", "_raw", "_raw_size", "_size", "_text", "_tokens", "overflowed")

    def __init__(self, chat: bool) -> None:
        self._text = _CHAT_TEXT if chat else _COMPLETION_TEXT
        self._raw: list[bytes] = []
        self._raw_size = 0
        self._pieces: list[bytes] = []
        self._size = 0
        self._tokens = 0
        self.overflowed = False

    def add(self, data: bytes) -> None:
        self._raw.append(data)
        self._raw_size += len(data)
        if self._raw_size > COMPACT_AT:
            self._compact()

    def _compact(self) -> None:
        raw = self._raw[0] if len(self._raw) == 1 else b"".join(self._raw)
        self._raw.clear()
        self._raw_size = 0
        found = self._text.findall(raw)
        self._tokens += sum(1 for piece in found if piece)
        if self.overflowed:
            return
        self._size += sum(map(len, found))
        if self._size > MAX_ANSWER_BYTES:
            self.overflowed = True
            self._pieces.clear()
            return
        self._pieces.extend(found)

    @property
    def tokens(self) -> int:
        """Events that carried text: vLLM streams one per generated token."""
        if self._raw:
            self._compact()
        return self._tokens

    def text(self) -> str | None:
        """The answer's text, or None when it was too long to keep or unreadable."""
        if self._raw:
            self._compact()
        if self.overflowed:
            return None
        try:
            text = json.loads(b'"' + b"".join(self._pieces) + b'"')
        except ValueError:
            return None
        return text if isinstance(text, str) else None


def answer_of(payload: Any) -> str | None:
    """The text of a non-streamed answer's first choice (chat or completions)."""
    if not isinstance(payload, dict):
        return None
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    choice = choices[0]
    message = choice.get("message")
    text = message.get("content") if isinstance(message, dict) else choice.get("text")
    return text if isinstance(text, str) else None
