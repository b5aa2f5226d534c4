"""The precise routing key: a request's prompt tokens and vLLM's block hashes of them.

For a pool with `precise` configured, the handler tokenizes the body once as the pool's workers
will (`vllm_wire.prompt_tokens`: same tokenizer, chat template and special tokens) and hashes the
full blocks with vLLM's chained block hash (`vllm_wire.block_hash`: same block size, algorithm,
seed, the LoRA adapter in every block and `cache_salt` in block 0), keeping the low 64 bits
that KV events carry. A body the tokenizer cannot render (the worker will answer 400 anyway)
routes on the approximate key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from router.config import PreciseConfig
from router.domain.policy import PreciseKey
from router.vllm_wire.block_hash import (
    LoraKey,
    block_extra_keys,
    hash_block_tokens,
    none_hash,
    to_event_int,
)
from router.vllm_wire.prompt_tokens import PromptTokenizer, build_prompt_tokenizer
from router.vllm_wire.word_tokenizer import PromptError

_MEMO_ENTRIES = 200_000


class PreciseKeyer:
    """Built once per pool (loading the tokenizer); `key` runs once per request."""

    def __init__(self, config: PreciseConfig) -> None:
        self.config = config
        self.tokenizer: PromptTokenizer = build_prompt_tokenizer(
            config.tokenizer, config.chat_template, config.bos_token, config.eos_token
        )
        self._memo: dict[tuple[bytes, tuple[int, ...], Any], tuple[bytes, int]] = {}

    def key(
        self, body: Mapping[str, Any], chat: bool, lora: LoraKey | None = None
    ) -> PreciseKey | None:
        try:
            tokens = self.tokenizer.request_ids(body, chat)
        except PromptError:
            return None
        salt = body.get("cache_salt")
        return PreciseKey(
            len(tokens),
            self._hashes(tokens, salt if isinstance(salt, str) and salt else None, lora),
        )

    def _hashes(self, tokens: Sequence[int], salt: str | None, lora: LoraKey | None) -> list[int]:
        """vLLM's chained block hashes, memoized per (parent, block): the prompts of one fleet
        share long prefixes (system prompts, earlier turns), and a dict hit costs a fraction of
        a SHA-256 over a pickled block."""
        cfg = self.config
        size = cfg.block_size
        toks = tuple(tokens)
        memo = self._memo
        if len(memo) > _MEMO_ENTRIES:
            memo.clear()  # crude but bounded; a busy fleet refills the hot prefixes at once
        parent = none_hash(cfg.hash_algo, cfg.hash_seed)
        out: list[int] = []
        first, rest = block_extra_keys(0, salt, lora=lora), block_extra_keys(1, salt, lora=lora)
        for index, start in enumerate(range(0, len(toks) - size + 1, size)):
            block = toks[start : start + size]
            extra = first if index == 0 else rest
            memo_key = (parent, block, extra)
            found = memo.get(memo_key)
            if found is None:
                digest = hash_block_tokens(parent, block, extra, cfg.hash_algo)
                found = memo[memo_key] = (digest, to_event_int(digest))
            parent = found[0]
            out.append(found[1])
        return out
