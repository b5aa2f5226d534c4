"""The precise routing key: a request's prompt tokens and vLLM's block hashes of them.

For a pool with `precise` configured, the handler tokenizes the body once as the pool's workers
will (`vllm_wire.prompt_tokens`: same tokenizer, chat template and special tokens) and hashes the
full blocks with vLLM's chained block hash (`vllm_wire.block_hash`: same block size, algorithm,
seed, and `cache_salt` in block 0), keeping the low 64 bits that KV events carry. A body the
tokenizer cannot render (the worker will answer 400 anyway) routes on the approximate key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from router.config import PreciseConfig
from router.vllm_wire.block_hash import block_hashes, to_event_int
from router.vllm_wire.prompt_tokens import PromptTokenizer, build_prompt_tokenizer
from router.vllm_wire.word_tokenizer import PromptError


@dataclass(frozen=True, slots=True)
class PreciseKey:
    prompt_tokens: int
    block_hashes: list[int]


class PreciseKeyer:
    """Built once per pool (loading the tokenizer); `key` runs once per request."""

    def __init__(self, config: PreciseConfig) -> None:
        self.config = config
        self.tokenizer: PromptTokenizer = build_prompt_tokenizer(
            config.tokenizer, config.chat_template, config.bos_token, config.eos_token
        )

    def key(self, body: Mapping[str, Any], chat: bool) -> PreciseKey | None:
        try:
            tokens = self.tokenizer.request_ids(body, chat)
        except PromptError:
            return None
        salt = body.get("cache_salt")
        cfg = self.config
        digests = block_hashes(
            tokens,
            cfg.block_size,
            cfg.hash_algo,
            cfg.hash_seed,
            salt if isinstance(salt, str) and salt else None,
        )
        return PreciseKey(len(tokens), [to_event_int(d) for d in digests])
