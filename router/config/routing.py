"""A pool's routing settings: the policy, the approximate prefix index, precise mode."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from router.config.base import Strict


class RoundRobinPolicy(Strict):
    name: Literal["round_robin"] = "round_robin"


class LeastLoadPolicy(Strict):
    name: Literal["least_load"] = "least_load"


class ConsistentHashPolicy(Strict):
    """Session key -> worker on a hash ring, spilling over when a worker is over its bound."""

    name: Literal["consistent_hash"] = "consistent_hash"
    virtual_nodes: int = Field(160, ge=1)
    load_factor: float = Field(1.25, ge=1.0, description="bound = ceil(mean in-flight x factor)")


class PrefixPolicy(Strict):
    """SGLang-style baseline: cache threshold plus absolute/relative imbalance gate."""

    name: Literal["prefix"] = "prefix"
    cache_threshold: float = Field(0.5, ge=0.0, le=1.0)
    balance_abs_threshold: int = Field(32, ge=0)
    balance_rel_threshold: float = Field(1.1, ge=1.0)


class HybridPolicy(Strict):
    """Rank workers by estimated time to first token; sticky sessions within a margin."""

    name: Literal["hybrid"] = "hybrid"
    prefill_tokens_per_s: float = Field(
        20000.0, gt=0, description="prefill rate used when a worker reports none"
    )
    decode_s_per_running: float = Field(
        0.002, ge=0, description="TTFT added per sequence already decoding on the worker"
    )
    balance_s_per_request: float = Field(
        0.02,
        ge=0,
        description="cost charged per request the gateway has in flight on the worker: the price"
        " of concentration that a TTFT estimate does not see (a session's later turns follow"
        " its first, and every running sequence slows the worker's steps until it ends)",
    )
    adapter_load_s: float = Field(
        0.1,
        ge=0,
        description="LoRA: TTFT added on a worker whose batches do not run the request's "
        "adapter (it has to load it)",
    )
    adapter_slot_wait_s: float = Field(
        0.5,
        ge=0,
        description="LoRA: added on top when every adapter slot (vLLM's max_loras) of the "
        "worker is taken by other adapters",
    )
    queue_s_per_waiting: float = Field(
        0.05, ge=0, description="TTFT added per request waiting in the worker's own queue"
    )
    placement_s_per_recent_request: float = Field(
        0.01,
        ge=0,
        description="for placements (a session's first turn, a request without a session): "
        "cost per request a worker was given lately (decayed over recent_window_s) beyond "
        "placement_tolerance above the candidates' mean; 0 turns it off",
    )
    placement_tolerance: float = Field(
        0.1,
        ge=0,
        description="share above the mean recent load that placements ignore: below it, "
        "cache affinity alone decides",
    )
    recent_window_s: float = Field(
        10.0, gt=0, description="time constant of the recent-requests count used for placement"
    )
    # 0.25 s, not less: behind several replicas a session's worker looks busier than it is
    # (the others' requests are known from its last load report, up to a second old), and at
    # 0.05 s 4 replicas moved 10 of 268 later turns off their worker, each losing its cached
    # history (multiturn hit 0.867-0.872 against one gateway's 0.882; at 0.25 s: 0.886).
    session_margin_s: float = Field(
        0.25, ge=0, description="a session stays on its worker while within this of the best"
    )
    affinity_margin_s: float = Field(
        0.1,
        ge=0,
        description="for requests without a session: among workers within this of the best "
        "estimate, the one holding the most of the prompt wins (a copy of a prefix elsewhere "
        "costs cache space the estimate omits)",
    )
    copy_weight: float = Field(
        0.5,
        ge=0,
        description="for requests without a session: seconds added per second of prefill a"
        " choice computes again, the tokens of the longest prefix that one worker alone holds"
        " and this one lacks, at this worker's prefill rate (a copy's GPU time and cache space,"
        " which the TTFT estimate omits); not for a prefix held twice or a holder given well"
        " over its share of recent requests; 0 leaves TTFT alone to decide",
    )
    session_max_entries: int = Field(
        100_000, ge=1, description="sessions remembered in memory; least recently used go first"
    )
    session_ttl_s: float = Field(
        3600.0, gt=0, description="a session idle this long forgets its worker"
    )


PolicyConfig = Annotated[
    RoundRobinPolicy | LeastLoadPolicy | ConsistentHashPolicy | PrefixPolicy | HybridPolicy,
    Field(discriminator="name"),
]
POLICY_NAMES = ("round_robin", "least_load", "consistent_hash", "prefix", "hybrid")


class IndexConfig(Strict):
    """The approximate prefix index: text chunks standing in for KV blocks."""

    block_chars: int = Field(64, ge=4, description="characters per block key (~16 tokens)")
    default_capacity_blocks: int = Field(
        50_000, ge=1, description="per-worker budget when the worker reports no KV capacity"
    )
    max_blocks_total: int = Field(2_000_000, ge=1, description="hard bound over all workers")
    dense_blocks: int = Field(
        16,
        ge=1,
        description="blocks keyed one by one at the start of a prompt; past twice this, keys"
        " thin out geometrically (spacing ~ position / dense_blocks) to bound routing time",
    )
    backend: Literal["flat", "pygtrie"] = Field(
        "flat", description="index structure: flat dict of chained keys (fast) or pygtrie"
    )


class PreciseConfig(Strict):
    """Precise prefix mode: the gateway tokenizes the prompt as the workers do, computes vLLM's
    block hashes, and matches them against the blocks workers reported (KV events via agents)."""

    tokenizer: str = Field(description='"word" (the simulated worker\'s) or a tokenizer.json path')
    chat_template: str | None = Field(
        None, description="Jinja2 chat template, a file path or the text (word: optional)"
    )
    bos_token: str | None = Field(None, description="the template's bos_token, if it uses one")
    eos_token: str | None = Field(None, description="the template's eos_token, if it uses one")
    block_size: int = Field(16, ge=1, description="the workers' KV block size in tokens")
    hash_algo: Literal["sha256", "sha256_cbor"] = Field(
        "sha256", description="the workers' --prefix-caching-hash-algo"
    )
    hash_seed: str = Field("vllm-none-hash", description="the workers' PYTHONHASHSEED, if set")
    speculative_ttl_s: float = Field(
        5.0, gt=0, description="a routed block counts as held this long unless an event says so"
    )
    default_capacity_blocks: int = Field(
        200_000, ge=1, description="per-worker bound on known blocks when it reports no capacity"
    )

    @model_validator(mode="after")
    def _loadable(self) -> PreciseConfig:
        # Load now, so a bad path or template fails the config (and a reload keeps the old one).
        from router.vllm_wire.prompt_tokens import build_prompt_tokenizer

        build_prompt_tokenizer(self.tokenizer, self.chat_template, self.bos_token, self.eos_token)
        return self
