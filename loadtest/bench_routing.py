"""Policy benchmark: the same seeded workload through every routing policy on one simulated fleet.

For each workload it starts 8 simulated vLLM workers (real timing model: an 8B model on an H100)
whose KV capacity is sized so the workload's working set does not fit one worker but nearly fits
the fleet, the cache-pressure regime where routing matters. Then, per policy: reset the workers'
caches and counters, start a fresh gateway process with that policy, replay the workload (open-
loop Poisson arrivals; sessions send their next turn after the answer plus a think time), and
read the workers' exact counters. It prints one table per workload (fleet hit rate, TTFT and E2E
percentiles, output tokens/s, load imbalance = max/mean requests per worker) against the
workload's intrinsic reuse (one unbounded worker, §10.11), writes it as JSON and a PNG, and checks
the acceptance points for `hybrid`. Every process shares the machine's cores, so the CPU share is
printed too: above ~70% the numbers start to measure starvation rather than routing.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import time
from typing import Any

import aiohttp
import redis.asyncio as aioredis
import uvloop

from loadtest.chart import write_chart
from loadtest.intrinsic import ChatTokens, intrinsic_reuse
from loadtest.procs import (
    Fleet,
    Proc,
    call_all,
    cpu_seconds,
    start_gateway_process,
    start_redis,
    start_sim,
    wait_ready,
)
from loadtest.replay import Replay, replay
from loadtest.stats import imbalance, percentile, print_table, write_json
from loadtest.workloads import (
    MixedSpec,
    MultiturnSpec,
    SharedSpec,
    Workload,
    gpu_blocks_for,
    mixed,
    multiturn_sessions,
    shared_prompts,
)

MODEL = "bench-llm"
WORKLOADS = ("shared", "multiturn", "mixed")
POLICIES = ("round_robin", "least_load", "consistent_hash", "prefix", "hybrid")
QUICK_POLICIES = ("round_robin", "prefix", "hybrid")


def build_workload(name: str, args: argparse.Namespace) -> Workload:
    scale = 0.2 if args.quick else 1.0
    duration = args.duration if args.duration is not None else 25.0 * scale
    shared = SharedSpec(
        groups=args.groups,
        prompts=args.prompts,
        system_tokens=args.system_tokens,
        rate=args.rate if args.rate is not None else SharedSpec.rate,
        duration_s=duration,
    )
    if name == "shared":
        return shared_prompts(shared, args.seed)
    if name == "multiturn":
        spec = MultiturnSpec()
        if args.quick:
            spec = MultiturnSpec(sessions=12, session_rate=6.0, turns_min=2, turns_max=4)
        if args.sessions is not None:
            spec = dataclasses.replace(spec, sessions=args.sessions)
        if args.session_rate is not None:
            spec = dataclasses.replace(spec, session_rate=args.session_rate)
        return multiturn_sessions(spec, args.seed)
    rate = (args.rate if args.rate is not None else SharedSpec.rate) * 0.75
    return mixed(
        MixedSpec(
            shared=SharedSpec(
                groups=args.groups,
                prompts=args.prompts,
                system_tokens=args.system_tokens,
                rate=rate,
                duration_s=duration,
            ),
            unique_rate=rate / 4,
        ),
        args.seed,
    )


def machine_busy_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far (Linux /proc/stat), all processes."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = ticks[3] + ticks[4]
    return (sum(ticks) - idle) / hz, sum(ticks) / hz


def _gateway_config(
    sims: list[Proc], policy: str, capacity: int, redis_url: str | None
) -> dict[str, Any]:
    workers = [{"url": s.url, "kv_capacity_blocks": capacity} for s in sims]
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


async def _all_healthy(url: str, count: int, timeout_s: float = 30.0) -> None:
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


async def _decision_reasons(url: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as resp:
        text = await resp.text()
    reasons: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("prefix_router_routing_decisions_total{"):
            labels, _, value = line.rpartition(" ")
            reason = labels.split('reason="', 1)[1].split('"', 1)[0]
            reasons[reason] = reasons.get(reason, 0.0) + float(value)
    return reasons


async def run_policy(
    policy: str,
    sims: list[Proc],
    capacity: int,
    workload: Workload,
    replicas: int = 1,
    redis_url: str | None = None,
) -> dict[str, Any]:
    await call_all(sims, "POST", "/sim/reset")
    if redis_url is not None:
        await _flush(redis_url)
    config = _gateway_config(sims, policy, capacity, redis_url)
    gateways = [start_gateway_process(config) for _ in range(replicas)]
    try:
        for gateway in gateways:
            await wait_ready(gateway.url, "/ready")
            await _all_healthy(gateway.url, len(sims))
        pids = [*(g.pid for g in gateways), *(s.pid for s in sims)]
        cpu0 = sum(cpu_seconds(p) for p in pids) + time.process_time()
        busy0, total0 = machine_busy_s()
        result = await replay([g.url for g in gateways], MODEL, workload)
        cpu = sum(cpu_seconds(p) for p in pids) + time.process_time() - cpu0
        busy1, total1 = machine_busy_s()
        counters = await call_all(sims, "GET", "/sim/counters")
        reasons: dict[str, float] = {}
        for gateway in gateways:
            for reason, count in (await _decision_reasons(gateway.url)).items():
                reasons[reason] = reasons.get(reason, 0.0) + count
    finally:
        for gateway in gateways:
            gateway.stop()
    row = _summarize(policy, result, counters, reasons, cpu)
    row["machine_busy"] = (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0
    return row


def _summarize(
    policy: str,
    result: Replay,
    counters: list[dict[str, Any]],
    reasons: dict[str, float],
    cpu_s: float,
) -> dict[str, Any]:
    ok = [r for r in result.records if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    e2e = [r.e2e_s for r in ok if r.e2e_s is not None]
    prompt = sum(c["prompt_tokens"] for c in counters)
    cached = sum(c["cached_tokens"] for c in counters)
    per_worker = [c["requests"] for c in counters]
    tokens = ChatTokens()
    served = [(tokens.prompt(r.messages), tokens.answer(r.answer)) for r in ok]
    intrinsic_hits, intrinsic_total = intrinsic_reuse(served)
    client_prompt = sum(len(p) for p, _ in served)
    return {
        "policy": policy,
        "requests": len(result.records),
        "errors": len(result.records) - len(ok),
        "hit_rate": cached / prompt if prompt else 0.0,
        "intrinsic": intrinsic_hits / intrinsic_total if intrinsic_total else 0.0,
        "ttft_p50_ms": percentile(ttft, 50) * 1000,
        "ttft_p90_ms": percentile(ttft, 90) * 1000,
        "ttft_p99_ms": percentile(ttft, 99) * 1000,
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


COLUMNS = [
    ("policy", "policy"),
    ("hit_rate", "hit rate"),
    ("of_intrinsic", "/intrinsic"),
    ("ttft_p50_ms", "TTFT p50 ms"),
    ("ttft_p90_ms", "p90"),
    ("ttft_p99_ms", "p99"),
    ("e2e_p50_ms", "E2E p50 ms"),
    ("e2e_p99_ms", "p99"),
    ("output_tok_s", "out tok/s"),
    ("imbalance", "imbalance"),
    ("errors", "errors"),
    ("cpu_share", "CPU"),
    ("machine_busy", "host CPU"),
]


def check_acceptance(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's acceptance points for `hybrid`, as printable lines (empty if not comparable)."""
    by = {r["policy"]: r for r in rows}
    hybrid = by.get("hybrid")
    if hybrid is None:
        return []
    lines = [f"hybrid hit rate = {hybrid['of_intrinsic']:.1%} of intrinsic (target >= 95%)"]
    if rr := by.get("round_robin"):
        for q in ("p50", "p99"):
            ratio = hybrid[f"ttft_{q}_ms"] / rr[f"ttft_{q}_ms"]
            lines.append(f"hybrid TTFT {q} = {ratio:.2f} x round_robin's (target <= 0.50)")
    if prefix := by.get("prefix"):
        lines.append(
            f"hybrid TTFT p99 {hybrid['ttft_p99_ms']:.0f} ms vs prefix "
            f"{prefix['ttft_p99_ms']:.0f} ms (target: lower)"
        )
    lines.append(f"hybrid imbalance {hybrid['imbalance']:.2f} (target <= 1.5)")
    return lines


async def run_workload(name: str, args: argparse.Namespace) -> dict[str, Any]:
    workload = build_workload(name, args)
    capacity = args.gpu_blocks or gpu_blocks_for(workload, args.workers, args.fleet_share)
    fleet = Fleet()
    try:
        redis_url = None
        if args.replicas > 1:
            redis = start_redis()
            fleet.procs.append(redis)
            redis_url = redis.url
        for i in range(args.workers):
            sim_args = ["--num-gpu-blocks", str(capacity), "--seed", str(args.seed + i)]
            fleet.procs.append(start_sim(MODEL, sim_args))
        sims = [p for p in fleet.procs if p.url.startswith("http")]
        await asyncio.gather(*(wait_ready(s.url, "/health") for s in sims))
        rows = []
        for policy in args.policies:
            rows.append(
                await run_policy(policy, sims, capacity, workload, args.replicas, redis_url)
            )
            r = rows[-1]
            print(
                f"  {name}/{policy}: {r['requests']} requests in {r['elapsed_s']:.1f}s, "
                f"hit {r['hit_rate']:.3f}, TTFT p50 {r['ttft_p50_ms']:.0f} ms",
                flush=True,
            )
    finally:
        fleet.stop()
    for r in rows:
        r["of_intrinsic"] = r["hit_rate"] / r["intrinsic"] if r["intrinsic"] else 0.0
    intrinsic = sum(r["intrinsic"] for r in rows) / len(rows)
    ws = workload.working_set_blocks
    replicas = f", {args.replicas} gateway replicas on one Redis" if args.replicas > 1 else ""
    print(f"\nworkload {name}: {workload.description}{replicas}")
    print(
        f"{args.workers} simulated workers x {capacity} KV blocks (working set ~{ws} blocks = "
        f"{ws / capacity:.1f} workers' caches); intrinsic reuse {intrinsic:.3f}"
    )
    print_table([h for _, h in COLUMNS], [[r[k] for k, _ in COLUMNS] for r in rows])
    cpu = max(r["cpu_share"] for r in rows)
    host = max(r["machine_busy"] for r in rows)
    lag = max(r["start_lag_p99_ms"] for r in rows)
    print(
        f"CPU: the benchmark's processes (gateway, sims, load generator) used at most {cpu:.0%} "
        f"of {os.cpu_count()} cores, the whole host at most {host:.0%}; schedule lag p99 <= "
        f"{lag:.1f} ms: "
        + (
            "simulated timing dominates"
            if host < 0.7 and lag < 20
            else "CPU-BOUND or disturbed by other load, distrust the tails"
        )
    )
    if not all(r["tokenization_matches"] for r in rows):
        print("WARNING: client-side tokenization disagrees with the workers' prompt counts")
    checks = check_acceptance(rows) if name in ("shared", "multiturn") else []
    for line in checks:
        print("  " + line)
    data = {
        "workload": name,
        "description": workload.description,
        "workers": args.workers,
        "kv_blocks_per_worker": capacity,
        "working_set_blocks": ws,
        "intrinsic_reuse": intrinsic,
        "seed": args.seed,
        "replicas": args.replicas,
        "rows": rows,
        "acceptance": checks,
    }
    write_json(args.json.format(workload=name), data)
    write_chart(args.png.format(workload=name), f"{name}: {workload.description}", rows, intrinsic)
    return data


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prefix-router bench routing", description=__doc__)
    parser.add_argument("--workload", choices=[*WORKLOADS, "all"], default="all")
    parser.add_argument("--policies", nargs="+", choices=POLICIES, help="default: all five")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: a fifth of the requests, shared and multiturn only, and only "
        "round_robin, prefix and hybrid unless --workload / --policies say otherwise",
    )
    parser.add_argument("--duration", type=float, help="seconds of open-loop arrivals")
    parser.add_argument("--rate", type=float, help="req/s of the shared workload")
    parser.add_argument("--groups", type=int, default=SharedSpec.groups)
    parser.add_argument("--prompts", type=int, default=SharedSpec.prompts)
    parser.add_argument("--system-tokens", type=int, default=SharedSpec.system_tokens)
    parser.add_argument("--sessions", type=int, help="multi-turn sessions")
    parser.add_argument("--session-rate", type=float, help="new sessions per second")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--gpu-blocks", type=int, help="per-worker KV blocks (default: sized)")
    parser.add_argument(
        "--fleet-share", type=float, default=1.0, help="fleet KV = this x the working set"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="gateway replicas sharing state through a Redis the benchmark starts; the client "
        "spreads requests over them in turn",
    )
    parser.add_argument("--json", default="loadtest/results/routing-{workload}.json")
    parser.add_argument("--png", default="loadtest/results/routing-{workload}.png")
    args = parser.parse_args(argv)
    if args.policies is None:
        args.policies = list(QUICK_POLICIES if args.quick else POLICIES)
    if args.workload != "all":
        names: tuple[str, ...] = (args.workload,)
    else:
        names = ("shared", "multiturn") if args.quick else WORKLOADS

    async def main() -> int:
        results = [await run_workload(name, args) for name in names]
        return 1 if any(r["errors"] for d in results for r in d["rows"]) else 0

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())
