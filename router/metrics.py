"""Every Prometheus object the gateway exports, built per app on its own registry.

Labels are bounded: model (pool name), status, policy, reason, worker id (a configured or
registered worker, never request data). Per-worker gauges are read at scrape time from the
Worker objects themselves, so the request path pays nothing for them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from router.domain.worker import Health, Worker
from router.loop_metrics import LoopCounter, LoopCounterChild, LoopHistogram

LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
KV_LAG_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 1.0, 5.0)
DECISION_BUCKETS_S = (
    0.000005,
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.0002,
    0.0005,
    0.001,
    0.0025,
    0.01,
)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
OVERHEAD_BUCKETS_S = (
    0.0001,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.005,
    0.01,
    0.025,
    0.1,
    0.5,
)
RATIO_BUCKETS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)


class _WorkerCollector(Collector):
    """Reads per-worker state at scrape time."""

    def __init__(self, workers: Callable[[], Iterable[Worker]]) -> None:
        self._workers = workers

    def collect(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily(
            "prefix_router_worker_in_flight", "Requests in flight per worker", labels=["worker"]
        )
        healthy = GaugeMetricFamily(
            "prefix_router_worker_healthy",
            "1 if the worker is routable (healthy, not ejected, not draining)",
            labels=["worker", "pool"],
        )
        backlog = GaugeMetricFamily(
            "prefix_router_worker_prefill_backlog_tokens",
            "Uncached prompt tokens dispatched to the worker awaiting their first byte",
            labels=["worker"],
        )
        # Why a worker is not routable: the active check's verdict, ejection and drain apart.
        state = GaugeMetricFamily(
            "prefix_router_worker_state",
            "1 for each state the worker is in: unproven, healthy, unhealthy, ejected, draining",
            labels=["worker", "pool", "state"],
        )
        now = time.monotonic()
        for w in self._workers():
            in_flight.add_metric([w.id], w.in_flight)
            healthy.add_metric([w.id, w.pool], 1.0 if w.routable else 0.0)
            backlog.add_metric([w.id], w.prefill_backlog_tokens)
            for health in Health:
                state.add_metric([w.id, w.pool, health.value], 1.0 if w.health is health else 0.0)
            state.add_metric([w.id, w.pool, "ejected"], 1.0 if w.ejected_until > now else 0.0)
            state.add_metric([w.id, w.pool, "draining"], 1.0 if w.draining else 0.0)
        yield in_flight
        yield healthy
        yield backlog
        yield state


class GatewayMetrics:
    def __init__(self, workers: Callable[[], Iterable[Worker]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = LoopCounter(
            "prefix_router_requests",
            "Requests answered, by model, HTTP status and policy",
            ["model", "status", "policy"],
            registry=r,
        )
        self.request_duration = LoopHistogram(
            "prefix_router_request_duration_seconds",
            "Time from request to the last byte",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.ttft = LoopHistogram(
            "prefix_router_time_to_first_token_seconds",
            "Time from request to the first byte of the upstream answer",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.inter_token = LoopHistogram(
            "prefix_router_inter_token_seconds",
            "Gap between two relayed chunks of a stream (about one token each with vLLM)",
            ["model"],
            buckets=ITL_BUCKETS_S,
            registry=r,
        )
        self.gateway_overhead = LoopHistogram(
            "prefix_router_gateway_overhead_seconds",
            "Time to first byte at the client minus the worker's own time to first byte (whole"
            " body when not streamed): what the gateway adds, queueing and failed attempts"
            " included",
            ["model"],
            buckets=OVERHEAD_BUCKETS_S,
            registry=r,
        )
        self.prompt_tokens = LoopCounter(
            "prefix_router_prompt_tokens",
            "Prompt tokens reported by workers",
            ["model"],
            registry=r,
        )
        self.cached_tokens = LoopCounter(
            "prefix_router_cached_prompt_tokens",
            "Prompt tokens workers served from their prefix cache",
            ["model"],
            registry=r,
        )
        self.completion_tokens = LoopCounter(
            "prefix_router_completion_tokens",
            "Completion tokens reported by workers",
            ["model"],
            registry=r,
        )
        self.decisions = LoopCounter(
            "prefix_router_routing_decisions",
            "Routing decisions by policy and reason",
            ["policy", "reason"],
            registry=r,
        )
        self.decision_time = LoopHistogram(
            "prefix_router_routing_decision_seconds",
            "Time to build the routing key, match the index and score workers",
            ["policy"],
            buckets=DECISION_BUCKETS_S,
            registry=r,
        )
        self.matched_ratio = LoopHistogram(
            "prefix_router_matched_prefix_ratio",
            "Share of the prompt the chosen worker was believed to hold",
            ["policy"],
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "prefix_router_retries", "Upstream retries by cause", ["cause"], registry=r
        )
        self.upstream_failures = Counter(
            "prefix_router_upstream_failures",
            "Failed upstream attempts by cause",
            ["cause"],
            registry=r,
        )
        self.upstream_resends = Counter(
            "prefix_router_upstream_resends",
            "Requests written again on a new connection because the kept-alive one had been "
            "closed by the worker before anything was written",
            registry=r,
        )
        self.stream_errors = Counter(
            "prefix_router_stream_errors",
            "Streams that broke after the first byte and were ended with an error event",
            ["model"],
            registry=r,
        )
        self.stream_migrations = Counter(
            "prefix_router_stream_migrations",
            "Broken streams by the cause of the break and what became of them: migrated to "
            "another worker, failed to, or why they could not be (n, logprobs, limit, ...)",
            ["cause", "outcome"],
            registry=r,
        )
        self.lora_loads = Counter(
            "prefix_router_lora_loads",
            "LoRA adapters the gateway loaded onto a worker (dynamic_lora), by outcome",
            ["pool", "outcome"],
            registry=r,
        )
        self.pd_steps = Counter(
            "prefix_router_pd_steps",
            "Steps of requests in P/D pools: prefill and decode attempts and their outcomes "
            "(ok, retried, no_params, restarted, failed), and requests sent to decode alone",
            ["pool", "step", "outcome"],
            registry=r,
        )
        self.ejections = Counter(
            "prefix_router_worker_ejections",
            "Outlier ejections by the cause of the last failure",
            ["cause"],
            registry=r,
        )
        self.health_transitions = Counter(
            "prefix_router_worker_health_transitions",
            "Worker health state changes",
            ["to"],
            registry=r,
        )
        self.rate_limited = Counter(
            "prefix_router_rate_limited",
            "Requests refused by a tenant limit (tenant names come from the YAML)",
            ["tenant", "limit"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "prefix_router_queue_depth",
            "Requests waiting for admission, by pool and priority",
            ["pool", "priority"],
            registry=r,
        )
        self.shed = Counter(
            "prefix_router_admission_rejected",
            "Requests refused by admission: queue timeout, queue full, shed for higher priority",
            ["pool", "priority", "cause"],
            registry=r,
        )
        self.result_cache = Counter(
            "prefix_router_result_cache",
            "Result-cache lookups of deterministic requests, by outcome",
            ["model", "result"],
            registry=r,
        )
        self.background_restarts = Counter(
            "prefix_router_background_restarts",
            "Background loops (health, load_scrape, discovery, Redis followers) restarted after"
            " an exception escaped them",
            ["loop"],
            registry=r,
        )
        self.kv_events_applied = Counter(
            "prefix_router_kv_events_applied",
            "Block events (hashes stored or removed, clears) applied to precise indexes",
            ["pool"],
            registry=r,
        )
        self.kv_event_lag = Histogram(
            "prefix_router_kv_event_lag_seconds",
            "From an agent's write of a KV event to Redis (its stream entry id) to the "
            "gateway applying it",
            ["pool"],
            buckets=KV_LAG_BUCKETS_S,
            registry=r,
        )
        self.redis_up = Gauge(
            "prefix_router_redis_up", "1 if the shared state backend answers", registry=r
        )
        self.redis_up.set(0)
        r.register(_WorkerCollector(workers))

        self._models: dict[str, ModelSeries] = {}
        self._policies: dict[str, PolicySeries] = {}

    def model(self, name: str) -> ModelSeries:
        """The per-request series of one model, bound once (model names come from the config,
        so this stays as small as the config)."""
        series = self._models.get(name)
        if series is None:
            series = self._models[name] = ModelSeries(self, name)
        return series

    def policy(self, name: str) -> PolicySeries:
        series = self._policies.get(name)
        if series is None:
            series = self._policies[name] = PolicySeries(self, name)
        return series

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ModelSeries:
    """One model's children of the per-request metrics: `.labels()` on every request costs a
    lock and a tuple check per series, a dozen times a request."""

    def __init__(self, metrics: GatewayMetrics, model: str) -> None:
        self._metrics = metrics
        self._model = model
        self.request_duration = metrics.request_duration.labels(model)
        self.ttft = metrics.ttft.labels(model)
        self.inter_token = metrics.inter_token.labels(model)
        self.gateway_overhead = metrics.gateway_overhead.labels(model)
        self.prompt_tokens = metrics.prompt_tokens.labels(model)
        self.cached_tokens = metrics.cached_tokens.labels(model)
        self.completion_tokens = metrics.completion_tokens.labels(model)
        self._requests: dict[tuple[int, str], LoopCounterChild] = {}

    def requests(self, status: int, policy: str) -> LoopCounterChild:
        child = self._requests.get((status, policy))
        if child is None:
            child = self._metrics.requests.labels(self._model, str(status), policy)
            self._requests[(status, policy)] = child
        return child


class PolicySeries:
    """One policy's children of the per-decision metrics."""

    def __init__(self, metrics: GatewayMetrics, policy: str) -> None:
        self._metrics = metrics
        self._policy = policy
        self.decision_time = metrics.decision_time.labels(policy)
        self.matched_ratio = metrics.matched_ratio.labels(policy)
        self._decisions: dict[str, LoopCounterChild] = {}

    def decisions(self, reason: str) -> LoopCounterChild:
        child = self._decisions.get(reason)
        if child is None:
            child = self._decisions[reason] = self._metrics.decisions.labels(self._policy, reason)
        return child
