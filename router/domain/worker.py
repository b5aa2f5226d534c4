"""One upstream worker as the gateway sees it: identity, health, and load.

Load has two sources. `in_flight` is the gateway's own count, incremented at dispatch and
decremented on every ending through `Dispatch.end()`, so it cannot leak. `reported` is what the
worker says about itself (scraped `/metrics`, or its agent through Redis). Policies read both
and never await: everything they need is already here.
"""

from __future__ import annotations

import enum
import ssl
import time
from dataclasses import dataclass, field
from typing import Literal

from router.config.endpoint import Endpoint, parse_endpoint

Role = Literal["prefill", "decode", "both"]
AdapterState = Literal["active", "room", "full"]


class Health(enum.Enum):
    UNPROVEN = "unproven"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


@dataclass(slots=True)
class ReportedLoad:
    """The worker's own numbers (vLLM metrics); `None` until first reported."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    block_size: int | None = None
    num_gpu_blocks: int | None = None
    prefix_hits: float = 0.0  # counters (tokens), summed over engines
    prefix_queries: float = 0.0
    lora_running: frozenset[str] = frozenset()
    """LoRA adapters of the requests in its batches and its queue (`vllm:lora_requests_info`,
    newest series), and its adapter slots (`max_lora`; None when it reports no LoRA)."""
    lora_waiting: frozenset[str] = frozenset()
    max_lora: int | None = None
    updated_at: float = 0.0


@dataclass(eq=False, slots=True)
class Worker:
    id: str
    url: str
    pool: str
    kv_capacity_blocks: int | None = None
    health: Health = Health.UNPROVEN
    discovered: bool = False
    """Registered by an agent through Redis rather than listed in the YAML."""
    agent_id: str | None = None
    """The id its agent registered (the worker's own id when discovered; for a YAML worker, the
    agent found beside it by URL): KV events name workers by it."""
    draining: bool = False
    in_flight: int = 0
    prefill_backlog_tokens: int = 0
    """Uncached prompt tokens dispatched here that have not produced a first byte yet."""
    peer_in_flight: int = 0
    """Requests on this worker that other gateway replicas sent, as of its last report (0 for
    a gateway that shares no fleet: nobody else sends it work)."""
    dispatched_total: int = 0
    consecutive_failures: int = 0
    ejected_until: float = 0.0
    ejections: int = 0
    reported: ReportedLoad = field(default_factory=ReportedLoad)
    role: Role = "both"
    """What it does in a P/D pool: prefill, decode, or both (a whole request)."""
    adapters: dict[str, str] = field(default_factory=dict)
    """LoRA adapters it serves (name -> path), as its `/v1/models` lists them."""
    ssl: ssl.SSLContext | None = None
    """The pool's TLS context for an https:// worker (the registry sets it from the config)."""
    endpoint: Endpoint = field(init=False)
    """The URL parsed for the relay; a URL it cannot use raises ValueError here."""

    def __post_init__(self) -> None:
        self.endpoint = parse_endpoint(self.url)

    @property
    def routable(self) -> bool:
        return (
            self.health is Health.HEALTHY
            and not self.draining
            and (not self.ejected_until or self.ejected_until <= time.monotonic())
        )

    def take_report(self, load: ReportedLoad, shared_fleet: bool) -> None:
        """Adopt the worker's own load report. With other replicas in front of the same fleet,
        what it runs and queues beyond this gateway's own in-flight count is their traffic: a
        replica that saw only its own share of the load would pile sessions onto workers the
        others keep busy (imbalance 2.3 at two replicas)."""
        self.reported = load
        if shared_fleet:
            self.peer_in_flight = max(0, load.running + load.waiting - self.in_flight)

    @property
    def fleet_in_flight(self) -> int:
        """Requests in flight on this worker from every gateway, as well as this one knows."""
        return self.in_flight + self.peer_in_flight

    @property
    def capacity_blocks(self) -> int | None:
        """KV capacity in blocks: configured value first, else what the worker reported."""
        return self.kv_capacity_blocks or self.reported.num_gpu_blocks

    def adapter_state(self, adapter: str) -> AdapterState:
        """Where `adapter` stands on this worker: in its batches or queue already (`active`),
        loadable into a free slot (`room`), or behind other adapters holding every slot."""
        load = self.reported
        in_use = load.lora_running | load.lora_waiting
        if adapter in in_use:
            return "active"
        if load.max_lora is not None and len(in_use) >= load.max_lora:
            return "full"
        return "room"

    def begin(self, prefill_tokens: int = 0) -> Dispatch:
        """Count one request in flight until `Dispatch.end()` (the relay's answer ends it on
        every ending, cancellation included, so the count cannot leak).

        `prefill_tokens` (the request's estimated uncached prompt tokens) stays in the
        worker's prefill backlog until `Dispatch.first_byte()` or the end, whichever is first.
        """
        self.in_flight += 1
        self.dispatched_total += 1
        self.prefill_backlog_tokens += prefill_tokens
        return Dispatch(self, prefill_tokens)


class Dispatch:
    """One request on one worker; releases its prefill backlog and its in-flight count exactly
    once each."""

    __slots__ = ("_ended", "_pending", "worker")

    def __init__(self, worker: Worker, prefill_tokens: int) -> None:
        self.worker = worker
        self._pending = prefill_tokens
        self._ended = False

    def end(self) -> None:
        if not self._ended:
            self._ended = True
            self.worker.in_flight -= 1
            self.first_byte()

    def first_byte(self) -> None:
        if self._pending:
            self.worker.prefill_backlog_tokens -= self._pending
            self._pending = 0
