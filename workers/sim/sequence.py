"""One request's life in the simulated engine, and the engine's exact counters."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

from router.vllm_wire.block_hash import LoraKey
from workers.sim.cache import EventExtras, SeqBlocks


class RequestState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"


@dataclass(slots=True)
class SimCounters:
    """Exact counters since start or the last reset; the Prometheus view is derived from these."""

    requests: int = 0
    prompt_tokens: int = 0  # prompt tokens of admitted requests (vLLM prefix_cache_queries too)
    cached_tokens: int = 0  # prefix-cache hits, in tokens
    generation_tokens: int = 0
    finished: int = 0
    aborted: int = 0
    preempted: int = 0  # never non-zero today: blocks are reserved at admission
    finished_by_reason: dict[str, int] = field(default_factory=dict)

    def reset(self) -> None:
        for f in fields(self):
            if f.name == "finished_by_reason":
                self.finished_by_reason.clear()
            else:
                setattr(self, f.name, 0)


class SimRequest:
    """One request's life in the engine; its consumer reads ``num_generated`` and ``state``."""

    __slots__ = (
        "all_tokens",
        "arrival_s",
        "block_ids",
        "blocks",
        "cache_salt",
        "finish_reason",
        "finish_s",
        "first_token_s",
        "hashes",
        "lease",
        "lora",
        "max_tokens",
        "num_cached_tokens",
        "num_computed",
        "num_generated",
        "num_prompt",
        "remote_prefilled",
        "request_id",
        "slow_credit",
        "slowdown",
        "state",
        "stream_tokens",
        "waiter",
    )

    def __init__(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        output_ids: Sequence[int],
        hashes: list[bytes],
        cache_salt: str | None,
        arrival_s: float,
        stream_tokens: bool,
        lora: LoraKey | None = None,
    ) -> None:
        self.request_id = request_id
        self.lora = lora
        self.lease = False  # P/D prefill: hold the blocks for a decode worker when finished
        self.remote_prefilled = False  # P/D decode: the prompt's KV came from a prefill worker
        self.block_ids: list[int] = []  # the blocks it held when it finished
        self.stream_tokens = stream_tokens  # wake the consumer per token, or only when done
        self.all_tokens: list[int] = [*prompt_ids, *output_ids]
        self.num_prompt = len(prompt_ids)
        self.max_tokens = len(output_ids)
        self.hashes = hashes
        self.cache_salt = cache_salt
        self.arrival_s = arrival_s
        self.first_token_s: float | None = None
        self.finish_s: float | None = None
        self.finish_reason: str | None = None
        self.num_computed = 0  # prompt tokens whose KV exists
        self.num_cached_tokens = 0
        self.num_generated = 0
        self.blocks: SeqBlocks | None = None
        self.state = RequestState.WAITING
        self.waiter: asyncio.Future[None] | None = None
        # Fault injection: steps per decoded token (inf pauses decoding), and steps banked so far.
        self.slowdown = 1.0
        self.slow_credit = 0.0

    @property
    def extras(self) -> EventExtras:
        return EventExtras(self.cache_salt, self.lora[0] if self.lora is not None else None)

    @property
    def done(self) -> bool:
        return self.state is RequestState.FINISHED or self.state is RequestState.ABORTED
