"""Intrinsic reuse: the prefix-cache hit rate of one worker with an unbounded cache (DESIGN §10.11).

The requests are replayed in arrival order against a set of every block ever cached. A prompt of
n tokens hits its leading whole blocks whose chained prefix is in the set, at most (n-1)//16 of
them (vLLM always computes the last prompt token); then its prompt and the generated tokens whose
KV was computed (all but the last, whole blocks only, as the simulated worker caches output
blocks) join the set. Prompts are tokenized exactly as the simulated worker does (its chat
template and word tokenizer); a block's identity is the chained hash of its 16 token ids, which is
all that prefix identity needs (vLLM's SHA-256 would give the same matches, slower).
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

from loadtest.workloads import BLOCK_TOKENS
from workers.sim.tokenizer import WordTokenizer, render_chat


class ChatTokens:
    """Token ids of chat prompts and answers, as the simulated worker computes them."""

    def __init__(self) -> None:
        self._tokenizer = WordTokenizer()

    def prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        return self._tokenizer.encode(render_chat(messages))

    def answer(self, text: str) -> list[int]:
        return self._tokenizer.encode(text)


def block_chain(tokens: Sequence[int], block_tokens: int = BLOCK_TOKENS) -> list[int]:
    """Chained hashes of the whole blocks of `tokens` (each stands for its entire prefix)."""
    chain: list[int] = []
    parent = 0
    for start in range(0, len(tokens) - block_tokens + 1, block_tokens):
        parent = hash((parent, tuple(tokens[start : start + block_tokens])))
        chain.append(parent)
    return chain


def intrinsic_reuse(
    requests: Iterable[tuple[Sequence[int], Sequence[int]]], block_tokens: int = BLOCK_TOKENS
) -> tuple[int, int]:
    """(hit tokens, prompt tokens) of `(prompt ids, output ids)` pairs served in this order by
    one worker whose cache never evicts."""
    return pooled_reuse(requests, sys.maxsize, block_tokens)


def pooled_reuse(
    requests: Iterable[tuple[Sequence[int], Sequence[int]]],
    capacity_blocks: int,
    block_tokens: int = BLOCK_TOKENS,
) -> tuple[int, int]:
    """(hit tokens, prompt tokens) of one LRU cache holding `capacity_blocks` blocks (DESIGN §7).

    The pooled-capacity reference: the fleet's whole KV capacity as one cache, nothing held
    twice, requests served one after another in arrival order. Hits are counted as in
    `intrinsic_reuse`; a hit refreshes its blocks, then the request's blocks join the cache as
    the most recent and the least recently used blocks beyond the capacity leave it. With an
    unbounded capacity this is the intrinsic reuse."""
    per_request = pooled_hits(requests, capacity_blocks, block_tokens)
    return sum(h for h, _ in per_request), sum(n for _, n in per_request)


class BlockLru:
    """One cache of `capacity_blocks` chained block hashes, least recently used out first."""

    def __init__(self, capacity_blocks: int) -> None:
        self._capacity = capacity_blocks
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def leading(self, prompt: Sequence[int], block_tokens: int = BLOCK_TOKENS) -> int:
        """Prompt tokens a request would find cached: whole leading blocks, at most
        (n-1)//block_tokens of them (vLLM always computes the last prompt token)."""
        chain = block_chain(prompt, block_tokens)
        limit = max(0, (len(prompt) - 1) // block_tokens)
        matched = 0
        while matched < limit and chain[matched] in self._blocks:
            matched += 1
        return matched * block_tokens

    def add(
        self, prompt: Sequence[int], output: Sequence[int], block_tokens: int = BLOCK_TOKENS
    ) -> None:
        """The request's prompt and computed output join as the most recent blocks."""
        blocks = self._blocks
        for block in block_chain([*prompt, *output[:-1]], block_tokens):
            blocks[block] = None
            blocks.move_to_end(block)
        while len(blocks) > self._capacity:
            blocks.popitem(last=False)


def pooled_hits(
    requests: Iterable[tuple[Sequence[int], Sequence[int]]],
    capacity_blocks: int,
    block_tokens: int = BLOCK_TOKENS,
) -> list[tuple[int, int]]:
    """(hit tokens, prompt tokens) of each request, served by one LRU of `capacity_blocks`."""
    lru = BlockLru(capacity_blocks)
    out: list[tuple[int, int]] = []
    for prompt, output in requests:
        out.append((lru.leading(prompt, block_tokens), len(prompt)))
        lru.add(prompt, output, block_tokens)
    return out
