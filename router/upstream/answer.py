"""The generated text of a relayed answer, kept so the prefix index can hold it too.

vLLM caches the KV of generated tokens as well as the prompt's, so the next turn of a
conversation (its history plus this answer) is cached on the worker that answered. The relay
keeps the raw event bytes it forwarded (up to a bound; longer answers are not indexed) and the
text is pulled out once, when the answer ended, with one regular expression over the bytes
instead of a JSON parse per event: the hot path pays a list append per chunk.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_ANSWER_BYTES = 1 << 20

# A JSON string value of "content" (chat deltas) or "text" (completions), escapes included.
_TEXT = re.compile(rb'"(?:content|text)":"((?:[^"\\]|\\.)*)"')


class AnswerBytes:
    """The event bytes of one streamed answer, bounded."""

    __slots__ = ("_chunks", "_size", "overflowed")

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self.overflowed = False

    def add(self, data: bytes) -> None:
        if self.overflowed:
            return
        self._size += len(data)
        if self._size > MAX_ANSWER_BYTES:
            self.overflowed = True
            self._chunks.clear()
            return
        self._chunks.append(data)

    def text(self) -> str | None:
        """The answer's text, or None when it was too long to keep or unreadable."""
        if self.overflowed:
            return None
        pieces = _TEXT.findall(b"".join(self._chunks))
        try:
            text = json.loads(b'"' + b"".join(pieces) + b'"')
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
