"""How many characters a token of this pool's traffic spans, learned from what workers count.

Approximate routing knows text, workers count tokens: the cache a worker holds, the prompt it
computes and its KV capacity are all in tokens. Four characters per token holds for English
prose; code, JSON and CJK text sit far from it in both directions (12 characters per token made
the index size each worker's budget at a third of what it held). Every answer's
`usage.prompt_tokens` against the routing key's length corrects the ratio: a slow exponential
average, clamped, so one odd prompt cannot swing a pool. `version` changes when the ratio moved
enough to matter, so indexes re-derive their budgets only then.
"""

from __future__ import annotations

CHARS_PER_TOKEN = 4
"""The cheap token estimate used everywhere in routing until a pool has learned its own: about
four characters per token (English prose)."""

_MIN_TOKENS = 16
"""Prompts shorter than a block say more about the chat template than about the text."""


class TokenCalibration:
    """Characters and UTF-8 bytes per token of one pool's prompts (both start at 4)."""

    def __init__(
        self, initial: float = CHARS_PER_TOKEN, weight: float = 0.05, low: float = 0.5
    ) -> None:
        self.chars_per_token = float(initial)
        self.bytes_per_token = float(initial)
        self.version = 0
        self.samples = 0
        self._weight = weight
        self._low = low
        self._high = 64.0
        self._published = float(initial)

    def estimate_tokens(self, key: str) -> int:
        """Prompt tokens of a routing key, at least 1."""
        return max(1, int(len(key) / self.chars_per_token))

    def observe(self, key: str, prompt_tokens: int | None) -> None:
        """Learn from one answered prompt: its key and the tokens the worker counted."""
        if not prompt_tokens or prompt_tokens < _MIN_TOKENS or not key:
            return
        self.samples += 1
        # The first answers weigh more, so a pool converges within a few dozen requests.
        weight = max(self._weight, 1.0 / (self.samples + 1))
        chars = min(self._high, max(self._low, len(key) / prompt_tokens))
        self.chars_per_token += weight * (chars - self.chars_per_token)
        raw = key.encode("utf-8", "surrogatepass")
        per_token = min(self._high, max(self._low, len(raw) / prompt_tokens))
        self.bytes_per_token += weight * (per_token - self.bytes_per_token)
        if abs(self.bytes_per_token - self._published) > 0.05 * self._published:
            self._published = self.bytes_per_token
            self.version += 1
