"""Scrape each worker's vLLM `/metrics` on an interval into `Worker.reported`.

Reads only the few series routing needs (running, waiting, KV usage, and the block size and
KV capacity from `vllm:cache_config_info`). Parsing is a line scan, not a full Prometheus
parser: it runs for every worker every interval and must stay cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable

import aiohttp

from router.config import LoadScrapeConfig
from router.upstream.registry import Registry
from router.upstream.worker import ReportedLoad, Worker

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
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def parse_vllm_metrics(text: str) -> ReportedLoad:
    """Sum the load gauges over engines; take block size and capacity from cache_config_info."""
    load = ReportedLoad(updated_at=time.monotonic())
    running = waiting = 0.0
    counters = {"prefix_hits": 0.0, "prefix_queries": 0.0}
    usage: list[float] = []
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name, _, rest = line.partition("{")
        if not rest:
            name, _, value_text = line.partition(" ")
            labels = ""
        else:
            labels, _, value_text = rest.rpartition("}")
        counter = _COUNTERS.get(name.strip())
        if counter is not None:
            with contextlib.suppress(ValueError, IndexError):
                counters[counter] += float(value_text.split()[0])
            continue
        field = _GAUGES.get(name.strip())
        if field is not None:
            try:
                value = float(value_text.split()[0])
            except (ValueError, IndexError):
                continue
            if field == "running":
                running += value
            elif field == "waiting":
                waiting += value
            else:
                usage.append(value)
        elif name == "vllm:cache_config_info":
            found = dict(_LABEL.findall(labels))
            if found.get("block_size", "").isdigit():
                load.block_size = int(found["block_size"])
            if found.get("num_gpu_blocks", "").isdigit():
                load.num_gpu_blocks = int(found["num_gpu_blocks"])
    load.running = int(running)
    load.waiting = int(waiting)
    load.kv_usage = max(usage) if usage else 0.0
    load.prefix_hits = counters["prefix_hits"]
    load.prefix_queries = counters["prefix_queries"]
    return load


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
        self.on_capacity: list[Callable[[Worker], None]] = []

    def reconfigure(self, config: LoadScrapeConfig) -> None:
        self._config = config

    async def run(self) -> None:
        while True:
            await self.scrape_all()
            await asyncio.sleep(self._config.interval_s)

    async def scrape_all(self) -> None:
        workers = [w for w in self._registry.workers() if w.health.value != "unhealthy"]
        if workers:
            await asyncio.gather(*(self.scrape(w) for w in workers))

    async def scrape(self, worker: Worker) -> None:
        timeout = aiohttp.ClientTimeout(total=self._config.timeout_s)
        try:
            async with self._session.get(worker.url + "/metrics", timeout=timeout) as resp:
                if resp.status != 200:
                    return
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError):
            return
        load = parse_vllm_metrics(text)
        capacity_changed = load.num_gpu_blocks != worker.reported.num_gpu_blocks
        worker.take_report(load, self._shared_fleet)
        if capacity_changed:
            for callback in self.on_capacity:
                callback(worker)
