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
from collections import Counter
from typing import Any

import redis.asyncio as aioredis
import uvloop

from loadtest.chart import write_chart
from loadtest.external_router import parse_routers, start_external, wait_external
from loadtest.gateway_probe import all_healthy, decision_reasons, machine_busy_s
from loadtest.intrinsic import ChatTokens, intrinsic_reuse, pooled_reuse
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
from loadtest.routing_report import COLUMNS, add_ratios, check_acceptance
from loadtest.stats import imbalance, percentile, print_table, write_json
from loadtest.trace import TRACE_FLEET_SHARE, add_trace_arguments, trace_spec, trace_workload
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
    if name == "trace":
        return trace_workload(trace_spec(args))
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
        pids = [*(g.pid for g in gateways), *(s.pid for s in sims)]
        cpu0 = sum(cpu_seconds(p) for p in pids) + time.process_time()
        busy0, total0 = machine_busy_s()
        result = await replay([g.url for g in gateways], MODEL, workload)
        cpu = sum(cpu_seconds(p) for p in pids) + time.process_time() - cpu0
        busy1, total1 = machine_busy_s()
        counters = await call_all(sims, "GET", "/sim/counters")
        reasons: dict[str, float] = {}
        if external is None:
            for gateway in gateways:
                for reason, count in (await decision_reasons(gateway.url)).items():
                    reasons[reason] = reasons.get(reason, 0.0) + count
    finally:
        for gateway in gateways:
            gateway.stop()
    row = _summarize(policy, result, counters, reasons, cpu, capacity * len(sims))
    row["machine_busy"] = (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0
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
    intrinsic_hits, intrinsic_total = intrinsic_reuse(served)
    pooled_hits, _ = pooled_reuse(served, fleet_blocks)
    client_prompt = sum(len(p) for p, _ in served)
    return {
        "policy": policy,
        "requests": len(result.records),
        "errors": len(result.records) - len(ok),
        "error_kinds": dict(Counter(r.error for r in result.records if not r.ok)),
        "hit_rate": cached / prompt if prompt else 0.0,
        "intrinsic": intrinsic_hits / intrinsic_total if intrinsic_total else 0.0,
        "pooled": pooled_hits / intrinsic_total if intrinsic_total else 0.0,
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


async def run_workload(name: str, args: argparse.Namespace) -> dict[str, Any]:
    workload = build_workload(name, args)
    share = args.fleet_share or (TRACE_FLEET_SHARE if name == "trace" else 1.0)
    capacity = args.gpu_blocks or gpu_blocks_for(workload, args.workers, share)
    routers = parse_routers(args.router_cmd, args.router_name)
    fleet = Fleet()
    try:
        redis_url = None
        if args.replicas > 1:
            redis = start_redis()
            fleet.procs.append(redis)
            redis_url = redis.url
        for i in range(args.workers):
            sim_args = ["--num-gpu-blocks", str(capacity), "--seed", str(args.seed + i)]
            if args.capacity == "hidden":
                sim_args.append("--hide-kv-capacity")
            fleet.procs.append(start_sim(MODEL, sim_args))
        sims = [p for p in fleet.procs if p.url.startswith("http")]
        await asyncio.gather(*(wait_ready(s.url, "/health") for s in sims))
        targets: list[tuple[str, str | None]] = [(p, None) for p in args.policies]
        targets += [(router_name, cmd) for router_name, cmd in routers]
        rows = []
        for label, cmd in targets:
            rows.append(
                await run_policy(
                    label,
                    sims,
                    capacity,
                    workload,
                    args.replicas if cmd is None else 1,
                    redis_url,
                    external=cmd,
                    capacity_in_yaml=args.capacity == "yaml",
                )
            )
            r = rows[-1]
            print(
                f"  {name}/{label}: {r['requests']} requests in {r['elapsed_s']:.1f}s, "
                f"hit {r['hit_rate']:.3f} (pooled {r['pooled']:.3f}), "
                f"TTFT p50 {r['ttft_p50_ms']:.0f} p99 {r['ttft_p99_ms']:.0f} ms, "
                f"imbalance {r['imbalance']:.2f}, errors {r['errors']}",
                flush=True,
            )
    finally:
        fleet.stop()
    add_ratios(rows)
    intrinsic = sum(r["intrinsic"] for r in rows) / len(rows)
    pooled = sum(r["pooled"] for r in rows) / len(rows)
    ws = workload.working_set_blocks
    replicas = f", {args.replicas} gateway replicas on one Redis" if args.replicas > 1 else ""
    print(f"\nworkload {name}: {workload.description}{replicas}")
    print(
        f"{args.workers} simulated workers x {capacity} KV blocks (working set ~{ws} blocks = "
        f"{ws / capacity:.1f} workers' caches; capacity {args.capacity}); intrinsic reuse "
        f"{intrinsic:.3f}, pooled-capacity reference {pooled:.3f}"
    )
    print_table([h for _, h in COLUMNS], [[r[k] for k, _ in COLUMNS] for r in rows])
    cpu = max(r["cpu_share"] for r in rows)
    host = max(r["machine_busy"] for r in rows)
    lag = max(r["start_lag_p99_ms"] for r in rows)
    print(
        f"CPU: the benchmark's processes (router, sims, load generator) used at most {cpu:.0%} "
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
    checks = check_acceptance(rows, {n for n, _ in routers})
    for line in checks:
        print("  " + line)
    data = {
        "workload": name,
        "description": workload.description,
        "workers": args.workers,
        "kv_blocks_per_worker": capacity,
        "capacity_source": args.capacity,
        "working_set_blocks": ws,
        "intrinsic_reuse": intrinsic,
        "pooled_reference": pooled,
        "seed": args.seed,
        "replicas": args.replicas,
        "peers": [n for n, _ in routers],
        "rows": rows,
        "acceptance": checks,
    }
    write_json(args.json.format(workload=name), data)
    write_chart(args.png.format(workload=name), f"{name}: {workload.description}", rows, intrinsic)
    return data


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prefix-router bench routing", description=__doc__)
    parser.add_argument("--workload", choices=[*WORKLOADS, "trace", "all"])
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
    add_trace_arguments(parser)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--gpu-blocks", type=int, help="per-worker KV blocks (default: sized)")
    parser.add_argument(
        "--fleet-share",
        type=float,
        help=f"fleet KV = this x the working set (default 1.0; {TRACE_FLEET_SHARE} for a trace)",
    )
    parser.add_argument(
        "--capacity",
        choices=("reported", "yaml", "hidden"),
        default="reported",
        help="how the gateway learns each worker's KV capacity: from its metrics (default), "
        "from the YAML, or not at all (sims run with --hide-kv-capacity)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="gateway replicas sharing state through a Redis the benchmark starts; the client "
        "spreads requests over them in turn",
    )
    parser.add_argument(
        "--router-cmd",
        action="append",
        help="an external router's command line, run in front of the same fleet (placeholders "
        "{port}, {workers}, {workers_csv}, {model}); repeatable",
    )
    parser.add_argument(
        "--router-name", action="append", help="the table's name for each --router-cmd, in order"
    )
    parser.add_argument("--json", default="loadtest/results/routing-{workload}.json")
    parser.add_argument("--png", default="loadtest/results/routing-{workload}.png")
    args = parser.parse_args(argv)
    if args.policies is None:
        args.policies = list(QUICK_POLICIES if args.quick else POLICIES)
    if args.workload is None:
        args.workload = "trace" if args.trace else "all"
    if args.workload == "trace" and not args.trace:
        parser.error("--workload trace needs --trace FILE")
    if args.workload != "all":
        names: tuple[str, ...] = (args.workload,)
    else:
        names = ("shared", "multiturn") if args.quick else WORKLOADS

    async def main() -> int:
        results = [await run_workload(name, args) for name in names]
        return 1 if any(r["errors"] for d in results for r in d["rows"]) else 0

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())
