"""Prometheus view of the simulated worker, with vLLM's metric names, labels and buckets.

Gateways scrape these exactly as they scrape a real vLLM (``reference/vllm-interface.md`` §3):
every series carries ``model_name`` and ``engine="0"``, counters end in ``_total``, and
``vllm:cache_config_info`` advertises the block size and KV capacity. Counters and gauges are not
updated on the hot path: a collector reads the engine's exact counters and queue lengths at scrape
time, so a generated token costs nothing here. Only the per-request latency histograms are
observed, once per finished request. Each app owns its registry; nothing touches the global one.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from workers.sim.config import SimConfig
from workers.sim.engine import RequestState, SimEngine, SimRequest
from workers.sim.lora import LoraInfoSeries

# vllm/v1/metrics/buckets.py
TTFT_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS_S = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
    50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")
_LABELS = ("model_name", "engine")


class _EngineCollector(Collector):
    """Derives vLLM's gauges and counters from the engine state at scrape time."""

    def __init__(self, config: SimConfig, engine: SimEngine) -> None:
        self._config = config
        self._engine = engine
        self._label_values = [config.model, "0"]
        self._lora = LoraInfoSeries(config.max_loras) if config.enable_lora else None

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=_LABELS)
        family.add_metric(self._label_values, value)
        return family

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc, labels=_LABELS)
        family.add_metric(self._label_values, value)
        return family

    def collect(self) -> Iterable[Metric]:
        engine = self._engine
        counters = engine.counters
        yield self._gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            engine.num_running,
        )
        yield self._gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            engine.num_waiting,
        )
        yield self._gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            engine.cache.usage,
        )
        yield self._counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            counters.prompt_tokens,
        )
        yield self._counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            counters.cached_tokens,
        )
        yield self._counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", counters.prompt_tokens
        )
        yield self._counter(
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            counters.generation_tokens,
        )
        yield self._counter(
            "vllm:num_preemptions",
            "Cumulative number of preemption from the engine.",
            counters.preempted,
        )
        success = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=(*_LABELS, "finished_reason"),
        )
        by_reason = counters.finished_by_reason
        for reason in FINISH_REASONS:
            success.add_metric([*self._label_values, reason], by_reason.get(reason, 0))
        yield success
        if self._lora is not None:
            # vLLM sets the series of the current (running, waiting) adapters to the time each
            # step; the simulator does it when scraped, which is when anyone can tell.
            self._lora.record(*engine.adapters_in_use())
            lora = GaugeMetricFamily(
                "vllm:lora_requests_info",
                "Running stats on lora requests.",
                labels=("max_lora", "running_lora_adapters", "waiting_lora_adapters"),
            )
            for labels, stamp in self._lora.samples():
                lora.add_metric(labels, stamp)
            yield lora
        cfg = self._config
        if not cfg.export_kv_capacity:
            return  # as an OpenAI-compatible server that exports no cache config
        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            labels=(
                "block_size",
                "num_gpu_blocks",
                "enable_prefix_caching",
                "prefix_caching_hash_algo",
                "engine",
                "model_name",
            ),
        )
        info.add_metric(
            [str(cfg.block_size), str(cfg.num_gpu_blocks), "True", cfg.hash_algo, "0", cfg.model],
            1.0,
        )
        yield info


class SimMetrics:
    """The app's registry: scrape-time collector plus the latency histograms."""

    def __init__(self, config: SimConfig, engine: SimEngine) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_EngineCollector(config, engine))
        labels = {"model_name": config.model, "engine": "0"}
        self._ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            labelnames=_LABELS,
            buckets=TTFT_BUCKETS_S,
            registry=self.registry,
        ).labels(**labels)
        self._e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            labelnames=_LABELS,
            buckets=REQUEST_LATENCY_BUCKETS_S,
            registry=self.registry,
        ).labels(**labels)
        engine.add_finish_callback(self.observe_finished)

    def observe_finished(self, req: SimRequest) -> None:
        if req.first_token_s is not None:
            self._ttft.observe(req.first_token_s - req.arrival_s)
        if req.state is RequestState.FINISHED and req.finish_s is not None:
            self._e2e.observe(req.finish_s - req.arrival_s)
