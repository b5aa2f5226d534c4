"""The values that cross the relay: one client request to forward, and what became of it.

Handlers build an `UpstreamCall`; the proxy fills a `CallResult` that the access log, metrics
and rate-limit reconciliation read after the response ended.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from router.domain.policy import Decision, RoutingRequest
from router.domain.pool import Pool
from router.domain.worker import Worker
from router.upstream.sse import Usage


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
