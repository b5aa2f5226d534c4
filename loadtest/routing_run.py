"""One row of the policy benchmark: a router in front of the fleet, the workload replayed through
it, and what the workers counted (hit rate, latency percentiles, balance) beside what the gateway
spent (its CPU per request, its routing decision time from its own histogram).
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from typing import Any

import redis.asyncio as aioredis

from loadtest.external_router import start_external, wait_external
from loadtest.gateway_probe import (
    all_healthy,
    bucket_quantile,
    decision_reasons,
    machine_busy_s,
    summed_decisions,
)
from loadtest.intrinsic import ChatTokens, pooled_hits, pooled_reuse
from loadtest.procs import Proc, call_all, cpu_seconds, start_gateway_process, wait_ready
from loadtest.replay import Replay, replay, write_records
from loadtest.stats import imbalance, percentile
from loadtest.ttft_floor import ttft_floors_s
from loadtest.workloads import Workload
from workers.sim.config import SimConfig

MODEL = "bench-llm"


def _gateway_config(
    sims: list[Proc], policy: str, capacity: int | None, redis_url: str | None
) -> dict[str, Any]:
    """Capacity in the YAML only when asked: by default the gateway reads what workers report
    (`vllm:cache_config_info`) or learns it from their cached tokens, as in production."""
    extra = {} if capacity is None else {"kv_capacity_blocks": capacity}
    workers = [{"url": s.url, **extra} for s in sims]
    state: dict[str, Any] = {"backend": "memory"}
    if redis_url is not None:
        state = {"backend": "redis", "redis_url": redis_url, "timeout_s": 0.2}
    return {
        "listen": {"host": "127.0.0.1", "port": 0},
        "log_level": "warning",
        "debug_headers": True,
        "auth": {"enabled": False},
        "state": state,
        "pools": {MODEL: {"workers": workers, "policy": {"name": policy}}},
    }


async def _flush(redis_url: str) -> None:
    """A fresh shared state per policy: sessions and index entries must not carry over."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.flushall()
    finally:
        await client.aclose()


async def run_policy(
    policy: str,
    sims: list[Proc],
    capacity: int,
    workload: Workload,
    replicas: int = 1,
    redis_url: str | None = None,
    external: str | None = None,
    capacity_in_yaml: bool = False,
    records: str | None = None,
) -> dict[str, Any]:
    """One row: `policy` through the gateway, or the external router whose template is given."""
    if redis_url is not None:
        await _flush(redis_url)
    if external is not None:
        gateways = [start_external(external, [s.url for s in sims], MODEL)]
    else:
        config = _gateway_config(sims, policy, capacity if capacity_in_yaml else None, redis_url)
        gateways = [start_gateway_process(config) for _ in range(replicas)]
    try:
        for gateway in gateways:
            if external is not None:
                await wait_external(gateway, MODEL)
            else:
                await wait_ready(gateway.url, "/ready")
                await all_healthy(gateway.url, len(sims))
        # After start-up: a router's own readiness probes must not count as the workload's.
        await call_all(sims, "POST", "/sim/reset")
        # One process may serve many sims (a one-process fleet): count each process once.
        router_pids = {g.pid for g in gateways}
        pids = router_pids | {s.pid for s in sims}
        cpu0 = sum(cpu_seconds(p) for p in pids) + time.process_time()
        router_cpu0 = sum(cpu_seconds(p) for p in router_pids)
        decisions0 = await summed_decisions([g.url for g in gateways]) if external is None else {}
        busy0, total0 = machine_busy_s()
        result = await replay([g.url for g in gateways], MODEL, workload)
        cpu = sum(cpu_seconds(p) for p in pids) + time.process_time() - cpu0
        router_cpu = sum(cpu_seconds(p) for p in router_pids) - router_cpu0
        busy1, total1 = machine_busy_s()
        counters = await call_all(sims, "GET", "/sim/counters")
        reasons: dict[str, float] = {}
        decisions = await summed_decisions([g.url for g in gateways]) if external is None else {}
        if external is None:
            for gateway in gateways:
                for reason, count in (await decision_reasons(gateway.url)).items():
                    reasons[reason] = reasons.get(reason, 0.0) + count
    finally:
        for gateway in gateways:
            gateway.stop()
    if records is not None:
        write_records(records, result.records)
    row = _summarize(policy, result, counters, reasons, cpu, capacity * len(sims))
    row["machine_busy"] = (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0
    row["router_cpu_ms_per_request"] = 1000 * router_cpu / max(1, row["requests"])
    row["decision_p50_us"] = 1e6 * bucket_quantile(decisions0, decisions, 0.5)
    row["decision_p99_us"] = 1e6 * bucket_quantile(decisions0, decisions, 0.99)
    return row


def _summarize(
    policy: str,
    result: Replay,
    counters: list[dict[str, Any]],
    reasons: dict[str, float],
    cpu_s: float,
    fleet_blocks: int,
) -> dict[str, Any]:
    ok = [r for r in result.records if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    e2e = [r.e2e_s for r in ok if r.e2e_s is not None]
    prompt = sum(c["prompt_tokens"] for c in counters)
    cached = sum(c["cached_tokens"] for c in counters)
    per_worker = [c["requests"] for c in counters]
    tokens = ChatTokens()
    served = [(tokens.prompt(r.messages), tokens.answer(r.answer)) for r in ok]
    intrinsic = pooled_hits(served, sys.maxsize)  # one unbounded cache: the reuse and floors
    intrinsic_hits = sum(h for h, _ in intrinsic)
    intrinsic_total = sum(n for _, n in intrinsic)
    pooled, _ = pooled_reuse(served, fleet_blocks)
    client_prompt = sum(len(p) for p, _ in served)
    floors = ttft_floors_s(intrinsic, SimConfig(model=MODEL))
    return {
        "policy": policy,
        "requests": len(result.records),
        "errors": len(result.records) - len(ok),
        "error_kinds": dict(Counter(r.error for r in result.records if not r.ok)),
        "hit_rate": cached / prompt if prompt else 0.0,
        "intrinsic": intrinsic_hits / intrinsic_total if intrinsic_total else 0.0,
        "pooled": pooled / intrinsic_total if intrinsic_total else 0.0,
        "ttft_p50_ms": percentile(ttft, 50) * 1000,
        "ttft_p90_ms": percentile(ttft, 90) * 1000,
        "ttft_p99_ms": percentile(ttft, 99) * 1000,
        "ttft_floor_p50_ms": percentile(floors, 50) * 1000,
        "ttft_floor_p99_ms": percentile(floors, 99) * 1000,
        "e2e_p50_ms": percentile(e2e, 50) * 1000,
        "e2e_p99_ms": percentile(e2e, 99) * 1000,
        "output_tok_s": sum(r.output_tokens for r in ok) / result.elapsed_s,
        "imbalance": imbalance(per_worker),
        "per_worker_requests": per_worker,
        "cpu_share": cpu_s / (result.elapsed_s * (os.cpu_count() or 1)),
        "start_lag_p99_ms": percentile(result.lag_s, 99) * 1000,
        "tokenization_matches": client_prompt == prompt,
        "decision_reasons": reasons,
        "elapsed_s": result.elapsed_s,
    }
