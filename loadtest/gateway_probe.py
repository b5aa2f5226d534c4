"""What the policy benchmark reads off a running gateway and the host: readiness of the fleet
behind it, its routing decisions by reason, and the machine's CPU use (all processes)."""

from __future__ import annotations

import asyncio
import os
import time

import aiohttp
from prometheus_client.parser import text_string_to_metric_families


def machine_busy_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far (Linux /proc/stat), all processes."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = ticks[3] + ticks[4]
    return (sum(ticks) - idle) / hz, sum(ticks) / hz


async def all_healthy(url: str, count: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            async with session.get(url + "/metrics") as resp:
                text = await resp.text()
            healthy = [
                ln for ln in text.splitlines() if ln.startswith("prefix_router_worker_healthy{")
            ]
            if sum(ln.endswith(" 1.0") for ln in healthy) >= count:
                return
            await asyncio.sleep(0.05)
    raise RuntimeError(f"gateway {url} did not see {count} healthy workers in {timeout_s}s")


async def _summed_by_label(url: str, sample: str, label: str) -> dict[str, float]:
    """One sample name's values on a gateway's /metrics, summed per value of `label`."""
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as resp:
        text = await resp.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == sample:
                key = found.labels.get(label, "")
                out[key] = out.get(key, 0.0) + found.value
    return out


async def decision_buckets(url: str) -> dict[float, float]:
    """The gateway's routing-decision histogram so far: cumulative count per bucket bound
    (seconds), summed over policies."""
    by_bound = await _summed_by_label(url, "prefix_router_routing_decision_seconds_bucket", "le")
    return {float(bound): count for bound, count in by_bound.items()}


async def metric_total(url: str, name: str) -> float:
    """The sum of every sample of one metric (all label values) on a gateway's /metrics."""
    return sum((await _summed_by_label(url, name, "")).values())


async def summed_decisions(urls: list[str]) -> dict[float, float]:
    """Several replicas' routing-decision histograms, summed."""
    total: dict[float, float] = {}
    for url in urls:
        for bound, count in (await decision_buckets(url)).items():
            total[bound] = total.get(bound, 0.0) + count
    return total


def bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The upper bound of the bucket holding quantile `q` of what was observed between two
    reads of a cumulative histogram (NaN when nothing was)."""
    bounds = sorted(after)
    total = after[bounds[-1]] - before.get(bounds[-1], 0.0) if bounds else 0.0
    if total <= 0:
        return float("nan")
    for bound in bounds:
        if after[bound] - before.get(bound, 0.0) >= q * total:
            return bound
    return float("inf")


async def decision_reasons(url: str) -> dict[str, float]:
    return await _summed_by_label(url, "prefix_router_routing_decisions_total", "reason")


async def migration_outcomes(url: str) -> dict[str, float]:
    """A gateway's broken streams so far, by what became of them (migrated, or the reason)."""
    return await _summed_by_label(url, "prefix_router_stream_migrations_total", "outcome")
