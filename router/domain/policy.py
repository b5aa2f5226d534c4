"""The routing Protocol every policy implements, the values that cross it, and the optional
capabilities a policy may have (checked with isinstance, never with getattr).

`pick` is synchronous and does no I/O: loads and cache knowledge have already been pushed into
the state it reads. `observe` receives outcomes after the response ends.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from router.domain.worker import Worker


@dataclass(slots=True)
class RoutingRequest:
    """What a policy may know about a request."""

    model: str
    key: str
    """The routing key: the text vLLM will tokenize, in order (see routing/key.py)."""
    prompt_tokens: int
    """Estimated prompt tokens."""
    max_tokens: int
    session_id: str | None = None
    session_worker: str | None = None
    """The session's worker as the fleet's shared state knows it (another replica may have
    routed its previous turn); policies prefer it to their own memory."""
    adapter: str | None = None
    """The LoRA adapter the request names (None: the pool's base model)."""
    partition: str = ""
    """The request's prefix-cache partition: its LoRA adapter and `cache_salt`, which vLLM
    mixes into every block hash (routing/key.py `cache_partition`); "" for the base model
    without a salt. Requests in different partitions share no cached block."""
    block_hashes: list[int] | None = None
    """vLLM's block hashes of the prompt (event ints), for pools in precise mode; `prompt_tokens`
    is then exact."""


@dataclass(frozen=True, slots=True)
class PreciseKey:
    """A prompt as a precise pool's workers see it: its token count and vLLM's block hashes."""

    prompt_tokens: int
    block_hashes: list[int]


class PromptKeyer(Protocol):
    """Tokenizes and hashes a request body as a precise pool's workers will (routing's job)."""

    def key(
        self, body: Mapping[str, Any], chat: bool, lora: tuple[str, str] | None = None
    ) -> PreciseKey | None:
        """None when the body cannot be rendered (the worker will refuse it too). `lora` is
        the adapter the request names, as (name, path): vLLM hashes it into every block."""
        ...

    async def key_async(
        self,
        body: Mapping[str, Any],
        chat: bool,
        key_chars: int,
        lora: tuple[str, str] | None = None,
    ) -> PreciseKey | None:
        """The same key, computed off the event loop when the prompt is long (`key_chars`:
        its routing key's length)."""
        ...

    def close(self) -> None:
        """Stop whatever the keyer runs beside the gateway (a replaced pool's keyer)."""
        ...


@dataclass(slots=True)
class Decision:
    worker: Worker
    reason: str
    """Bounded vocabulary, used as a metric label: e.g. `round_robin`, `prefix_hit`, `sticky`."""
    matched_tokens: int = 0
    """Estimated prompt tokens the chosen worker already holds."""
    block_keys: list[int] | None = None
    """The approximate index keys the policy recorded for the chosen worker, so other replicas
    can record them too."""
    index_stamp: int = 0
    """Recency stamp of the chosen worker's deepest matched index entry before this pick, so
    the outcome can tell what the worker evicted."""
    matched_pending: bool = False
    """That entry was last indexed by a pick still waiting for its answer: the worker may be
    computing it yet, so a shortfall in cached tokens is no sign of an eviction."""
    pick_stamp: int = 0
    """Recency stamp of this pick's own insert (pending until its outcome)."""
    held_keys: int = 0
    """How many of `block_keys` the chosen worker held before this pick: the rest are what
    the pick indexed for it."""
    backlog_tokens: int = 0
    """The chosen worker's prefill backlog (tokens) at pick time, and its running sequences:
    what the request waited behind, for learning the worker's rates from its TTFT."""
    running: int = 0


@dataclass(slots=True)
class Outcome:
    """How a routed request ended."""

    request: RoutingRequest
    decision: Decision
    ok: bool
    unanswered: bool = False
    """The attempt failed before the worker's first byte: nothing of the prompt is known to
    be cached there."""
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    ttft_s: float | None = None
    """Streamed answers only: a non-streamed one's first byte comes when it is complete."""
    answer_key: str | None = None
    """The routing key extended by the answer's text (policies that index answers)."""
    share_insert: Callable[[str, list[int]], None] | None = None
    """Tell the other replicas what a policy indexed from this answer (worker id, block keys):
    without it, the next turn of a conversation that lands on another replica matches only the
    previous prompt, not the answer the worker also cached."""


class Policy(Protocol):
    name: str
    indexes_answers: bool
    """Whether outcomes should carry `answer_key` (the relay keeps the text only then)."""

    def pick(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Decision:
        """Choose one of `candidates` (never empty, all routable). No I/O, no awaits."""
        ...

    def observe(self, outcome: Outcome) -> None:
        """Learn from an ended request."""
        ...

    def forget_worker(self, worker: Worker) -> None:
        """Drop everything known about a worker that left the pool."""
        ...


@runtime_checkable
class SharesInserts(Protocol):
    """A policy that records other replicas' index inserts (their routing decisions)."""

    @property
    def key_scheme(self) -> str:
        """How its keys are made (hash, block size, checkpoints): replicas share inserts only
        with one another's scheme, since a key made another way names no prefix here (during a
        rolling upgrade, or with a different `index` config)."""
        ...

    def apply_remote_insert(
        self, worker_id: str, block_keys: list[int], prefill_tokens: int = 0
    ) -> None:
        """Another replica sent a request with these approximate keys to this worker, with
        `prefill_tokens` uncached (0: an answer's insert, or not said)."""
        ...


@runtime_checkable
class EstimatesCached(Protocol):
    """A policy that can tell how much of a prompt each worker holds (P/D's decider)."""

    def cached_tokens(self, request: RoutingRequest, candidates: Sequence[Worker]) -> list[int]:
        """Estimated prompt tokens each of `candidates` holds, in order."""
        ...
