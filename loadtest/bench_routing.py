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
from typing import Any

import uvloop

from loadtest.chart import write_chart
from loadtest.external_router import parse_routers
from loadtest.procs import (
    ONE_PROCESS_FLEET_ABOVE,
    Fleet,
    start_redis,
    start_sim,
    start_sim_fleet,
    wait_ready,
)
from loadtest.routing_report import COLUMNS, add_ratios, check_acceptance
from loadtest.routing_run import MODEL, run_policy
from loadtest.stats import print_table, write_json
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
        hide = ["--hide-kv-capacity"] if args.capacity == "hidden" else []
        if args.workers > ONE_PROCESS_FLEET_ABOVE:
            sim_args = ["--num-gpu-blocks", str(capacity), "--seed", str(args.seed), *hide]
            fleet.procs += start_sim_fleet(MODEL, args.workers, sim_args)
        else:
            for i in range(args.workers):
                sim_args = ["--num-gpu-blocks", str(capacity), "--seed", str(args.seed + i), *hide]
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
                    records=args.records.format(workload=name, router=label)
                    if args.records
                    else None,
                )
            )
            r = rows[-1]
            print(
                f"  {name}/{label}: {r['requests']} requests in {r['elapsed_s']:.1f}s, "
                f"hit {r['hit_rate']:.3f} (pooled {r['pooled']:.3f}), "
                f"TTFT p50 {r['ttft_p50_ms']:.0f} p99 {r['ttft_p99_ms']:.0f} ms, "
                f"imbalance {r['imbalance']:.2f}, errors {r['errors']}, router CPU "
                f"{r['router_cpu_ms_per_request']:.2f} ms/req, decision p99 "
                f"{r['decision_p99_us']:.0f} us",
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


def build_parser() -> argparse.ArgumentParser:
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
    parser.add_argument(
        "--workers",
        type=int,
        default=8,
        help=f"simulated workers (above {ONE_PROCESS_FLEET_ABOVE}: one process serves them all)",
    )
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
    parser.add_argument(
        "--records",
        help="write each request's record (route, cached tokens, timing, text) as JSON lines "
        "to this path ({workload} and {router} are replaced), for `bench routing-regret`",
    )
    parser.add_argument("--json", default="loadtest/results/routing-{workload}.json")
    parser.add_argument("--png", default="loadtest/results/routing-{workload}.png")
    return parser


def run(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
