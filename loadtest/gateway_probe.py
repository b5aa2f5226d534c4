"""What the policy benchmark reads off a running gateway and the host: readiness of the fleet
behind it, its routing decisions by reason, and the machine's CPU use (all processes)."""

from __future__ import annotations

import asyncio
import os
import time

import aiohttp


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


async def decision_reasons(url: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as resp:
        text = await resp.text()
    reasons: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("prefix_router_routing_decisions_total{"):
            labels, _, value = line.rpartition(" ")
            reason = labels.split('reason="', 1)[1].split('"', 1)[0]
            reasons[reason] = reasons.get(reason, 0.0) + float(value)
    return reasons
