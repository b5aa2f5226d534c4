"""Scrape each worker's vLLM `/metrics` on an interval into `Worker.reported`.

Reads only the few series routing needs (running, waiting, KV usage, the block size and KV
capacity from `vllm:cache_config_info`, the LoRA adapters in use from
`vllm:lora_requests_info`), parsed by prometheus_client's text parser; the page's other lines
(histograms, mostly) are skipped by name before parsing, since this runs for every worker every
interval. A sample that is not a finite, non-negative number (NaN, Inf, garbage) is skipped, and
an answer without a single load series keeps the worker's last report: one worker's bad
`/metrics` is logged once per cause and never stops the scraping of the others.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterator

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from router.config import LoadScrapeConfig
from router.domain.registry import Registry
from router.domain.worker import ReportedLoad, Worker
from router.logs import LogOnce
from router.supervisor import redact

log = logging.getLogger("prefix_router.load")

_GAUGES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_usage",
    "vllm:gpu_cache_usage_perc": "kv_usage",
}
# Counters the worker agent publishes (hit rate); older vLLM used the gpu_ prefix.
_COUNTERS = {
    "vllm:prefix_cache_hits_total": "prefix_hits",
    "vllm:gpu_prefix_cache_hits_total": "prefix_hits",
    "vllm:prefix_cache_queries_total": "prefix_queries",
    "vllm:gpu_prefix_cache_queries_total": "prefix_queries",
}
_INFO = "vllm:cache_config_info"
_LORA = "vllm:lora_requests_info"
_WANTED = frozenset((*_GAUGES, *_COUNTERS, _INFO, _LORA))


def _samples(text: str, rejected: set[str] | None) -> Iterator[Sample]:
    """The samples of the series routing reads, parsed by prometheus_client's text parser.

    vLLM's page is mostly histograms routing never reads; only the wanted series' lines reach
    the parser, one line at a time, so one malformed line costs that series alone (its name
    goes to `rejected`) and never the rest of the page."""
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name = line.partition("{")[0].partition(" ")[0]
        if name not in _WANTED:
            continue
        try:
            for family in text_string_to_metric_families(line + "\n"):
                yield from family.samples
        except (ValueError, IndexError, KeyError):
            if rejected is not None:
                rejected.add(name)


def _finite(value: float) -> bool:
    """A NaN would poison every score it enters, and `int()` of one raises."""
    return math.isfinite(value) and value >= 0


def _count(text: str) -> int | None:
    # ASCII only: "²".isdigit() holds, and int() of it raises.
    return int(text) if text.isascii() and text.isdigit() else None


def _take_lora(load: ReportedLoad, labels: dict[str, str]) -> None:
    def names(label: str) -> frozenset[str]:
        return frozenset(n.strip() for n in labels.get(label, "").split(",") if n.strip())

    load.lora_running = names("running_lora_adapters")
    load.lora_waiting = names("waiting_lora_adapters")
    load.max_lora = _count(labels.get("max_lora", ""))


def parse_vllm_metrics(text: str, rejected: set[str] | None = None) -> ReportedLoad:
    """Sum the load gauges over engines; take block size and capacity from cache_config_info.

    The names of series whose sample was skipped (malformed, NaN, Inf, negative) go to
    `rejected`, and "no load series" when the text had none of running, waiting and KV usage
    (`rejected` is then non-empty)."""
    load = ReportedLoad(updated_at=time.monotonic())
    seen_load = False
    running = waiting = 0.0
    counters = {"prefix_hits": 0.0, "prefix_queries": 0.0}
    usage: list[float] = []
    lora_stamp = -1.0
    for sample in _samples(text, rejected):
        name = sample.name
        if name == _LORA:
            # Every (running, waiting) pair vLLM ever saw stays a series; its value is when
            # it was last current, so the newest one is the present.
            if _finite(sample.value) and sample.value > lora_stamp:
                lora_stamp = sample.value
                _take_lora(load, sample.labels)
            continue
        if name == _INFO:
            labels = sample.labels
            load.block_size = _count(labels.get("block_size", "")) or load.block_size
            load.num_gpu_blocks = _count(labels.get("num_gpu_blocks", "")) or load.num_gpu_blocks
            continue
        value = sample.value
        if not _finite(value):
            if rejected is not None:
                rejected.add(name)
            continue
        counter = _COUNTERS.get(name)
        if counter is not None:
            counters[counter] += value
            continue
        seen_load = True
        field = _GAUGES[name]
        if field == "running":
            running += value
        elif field == "waiting":
            waiting += value
        else:
            usage.append(value)
    load.running = int(running)
    load.waiting = int(waiting)
    load.kv_usage = max(usage) if usage else 0.0
    load.prefix_hits = counters["prefix_hits"]
    load.prefix_queries = counters["prefix_queries"]
    if not seen_load and rejected is not None:
        rejected.add("no load series")
    return load


AGENT_REPORT_FRESH_S = 3.0
"""A worker whose agent published its load this recently is not scraped: the agent scraped it
already, once for every gateway replica (each replica scraping every worker would cost the
fleet replicas x workers scrapes a second). Older than this (the agent died, or Redis is away),
the gateway scrapes the worker itself again."""


def _agent_reports(worker: Worker, now: float) -> bool:
    return worker.agent_id is not None and now - worker.reported.updated_at < AGENT_REPORT_FRESH_S


class LoadScraper:
    def __init__(
        self,
        registry: Registry,
        session: aiohttp.ClientSession,
        config: LoadScrapeConfig,
        shared_fleet: bool = False,
    ) -> None:
        self._shared_fleet = shared_fleet
        self._registry = registry
        self._session = session
        self._config = config
        self._bad_answers = LogOnce(log)
        self.on_capacity: list[Callable[[Worker], None]] = []

    def reconfigure(self, config: LoadScrapeConfig) -> None:
        self._config = config

    async def run(self) -> None:
        while True:
            await self.scrape_all()
            await asyncio.sleep(self._config.interval_s)

    async def scrape_all(self) -> None:
        now = time.monotonic()
        workers = [
            w
            for w in self._registry.workers()
            if w.health.value != "unhealthy" and not _agent_reports(w, now)
        ]
        if workers:
            await asyncio.gather(*(self._scrape_one(w) for w in workers))

    def forget(self, worker_id: str) -> None:
        self._bad_answers.clear(worker_id)

    async def _scrape_one(self, worker: Worker) -> None:
        try:
            await self.scrape(worker)
        except Exception as exc:
            # Unforeseen breakage of one worker's scrape: its load stays as last reported, and
            # the other workers' scrapes in this round go on.
            self._bad_answers.warning(
                worker.id,
                type(exc).__name__,
                "scraping worker %s failed: %s",
                worker.id,
                redact(f"{type(exc).__name__}: {exc}"),
            )

    async def scrape(self, worker: Worker) -> None:
        timeout = aiohttp.ClientTimeout(total=self._config.timeout_s)
        try:
            async with self._session.get(
                worker.endpoint.url("/metrics"), timeout=timeout, ssl=worker.ssl or True
            ) as resp:
                if resp.status != 200:
                    return
                text = await resp.text()
        except UnicodeDecodeError:
            self._bad_answers.warning(
                worker.id, "undecodable", "worker %s /metrics is not text", worker.id
            )
            return
        except (aiohttp.ClientError, TimeoutError):
            return
        rejected: set[str] = set()
        load = parse_vllm_metrics(text, rejected)
        for cause in sorted(rejected):
            self._bad_answers.warning(
                worker.id, cause, "worker %s /metrics: skipped %s", worker.id, cause
            )
        if "no load series" in rejected:
            return  # not a vLLM load report: keep the last one rather than read it as idle
        if not rejected:
            self._bad_answers.clear(worker.id)  # a relapse is news again
        capacity_changed = load.num_gpu_blocks != worker.reported.num_gpu_blocks
        worker.take_report(load, self._shared_fleet)
        if capacity_changed:
            for callback in self.on_capacity:
                callback(worker)
