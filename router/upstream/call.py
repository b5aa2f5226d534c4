"""The values that cross the relay: one client request to forward, and what became of it.

Handlers build an `UpstreamCall`; the proxy fills a `CallResult` that the access log, metrics
and rate-limit reconciliation read after the response ended.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from router.domain.policy import Decision, RoutingRequest
from router.domain.pool import Pool
from router.domain.worker import Worker
from router.upstream.continuation import Kind, Transcript
from router.upstream.sse import Usage

Stage = Literal["prefill", "decode", "alone"]
"""A P/D pool's steps: prefill, decode with the prefill's KV, or a decode worker alone."""


@dataclass(slots=True)
class UpstreamCall:
    """Everything the relay needs about one client request."""

    pool: Pool
    routing: RoutingRequest
    path: str
    body: bytes
    stream: bool
    request_id: str
    client_wants_usage: bool = True
    debug_headers: bool = False
    extra_headers: dict[str, str] | None = None
    # Rewrites each block of complete events before it reaches the client (the seed API's
    # event shape); usage and [DONE] are read from the upstream bytes before it runs.
    transform: Callable[[bytes], bytes] | None = None
    collect_answer: bool = False
    """Keep the answer's text for the policy (it indexes prompt plus answer)."""
    on_decision: Callable[[Decision], None] | None = None
    """Called once per routing decision, before the request is sent (to share it)."""
    share_insert: Callable[[str, list[int]], None] | None = None
    """Shares what the policy indexes from the answer with the other replicas (`Outcome`)."""
    transcript: Transcript | None = None
    """What the client received so far (streams that can be migrated; shared by segments)."""
    migration: MigrationPlan | None = None
    seam: Callable[[bytes], bytes] | None = None
    """A continuation's rewrite of its events into the original stream's (before transform)."""
    usage_offset: int = 0
    """Tokens the client had before this segment: its usage is counted for the whole answer."""
    stage: Stage | None = None
    """In a P/D pool, the step this call is (None: the whole request, not yet split)."""
    cached_override: int | None = None
    """The answer's `cached_tokens` as the client must see them (a decode step's: the
    prefill's count, not the transferred KV the decode worker counts as cached)."""
    params_single_use: bool = False
    """A failure the worker saw spends the body (P/D transfer params): no retry with it."""
    retry_silence: bool = False
    """A worker silent past `first_byte_s` is retried elsewhere even when the config does not
    retry first-byte timeouts (a continuation: the client holds half an answer, and closing
    the silent worker's connection cancels its request, so no GPU runs it twice)."""


@dataclass(slots=True)
class MigrationPlan:
    """How a stream may be continued elsewhere if its worker breaks."""

    body: dict[str, Any]
    """The request as the worker got it (pool name, usage asked), to derive continuations."""
    kind: Kind
    allowed: int
    """Migrations this request may still make (the pool's `migrations`)."""
    refused: str | None = None
    """Why this request cannot be continued at all (n > 1, logprobs, ...), if so."""
    used: set[Worker] = field(default_factory=set)


@dataclass(slots=True)
class CallResult:
    """What the access log and metrics learn once a call ended."""

    status: int = 0
    worker: Worker | None = None
    decision: Decision | None = None
    attempts: int = 0
    ttft_s: float | None = None
    usage: Usage | None = None
    answer: str | None = None
    stream_broken: bool = False
    # perf_counter stamps and the worker's own wait, for the gateway-overhead metric.
    started_at: float = 0.0
    """When the dispatch began (admission waits excluded): TTFT counts from here."""
    sent_at: float = 0.0
    upstream_ttfb_s: float | None = None
    first_write_at: float = 0.0
    segments: list[str] = field(default_factory=list)
    """The worker of each segment of the answer (more than one when it was migrated)."""
    prefill_worker: str | None = None
    """The worker that ran the prefill step, in a P/D pool."""
