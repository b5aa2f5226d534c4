"""P/D disaggregation against an aggregated pool of the same size, on the same workload.

Two runs one after the other, each on a fresh fleet of `--workers` simulated workers (processes,
real step timing) behind one gateway: first every worker serving whole requests (hybrid
routing), then `--prefill` of them as prefill workers and the rest as decode workers (a P/D
pool: the gateway prefills on one, decodes on another, the KV moving between the simulated
NixlConnectors). The workload is streamed chat, open loop at `--rate`: a long document
(`--prompt-words`; each request its own, or one of `--documents` shared ones) with a distinct
question per request, `--max-tokens` answers. It reports TTFT and inter-token latency (p50/p99,
client-side gaps between content chunks), output throughput and errors per run. What P/D buys in
the simulator is what it buys on GPUs: decode steps no longer share a batch with long prefills,
so inter-token latency stays flat.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp
import uvloop

from loadtest.procs import Fleet, start_gateway_process, start_sim, wait_ready
from loadtest.stats import percentile, print_table, write_json

MODEL = "pd-llm"


@dataclass
class RunStats:
    ttft_s: list[float] = field(default_factory=list)
    gaps_s: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: int = 0


async def _one(
    session: aiohttp.ClientSession, url: str, body: dict[str, object], stats: RunStats
) -> None:
    start = time.perf_counter()
    last = 0.0
    done = False
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                stats.errors += 1
                return
            async for line in resp.content:
                if line.startswith(b"data: [DONE]"):
                    done = True
                    continue
                if not line.startswith(b"data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    break
                choices = event.get("choices") or []
                if not choices or not choices[0].get("delta", {}).get("content"):
                    continue
                now = time.perf_counter()
                if last:
                    stats.gaps_s.append(now - last)
                else:
                    stats.ttft_s.append(now - start)
                last = now
                stats.tokens += 1
    except (aiohttp.ClientError, TimeoutError):
        pass
    if not done:
        stats.errors += 1


def _body(args: argparse.Namespace, i: int) -> dict[str, object]:
    doc = i % args.documents if args.documents else i  # 0: every prompt its own document
    document = " ".join(f"d{doc}w{k}" for k in range(args.prompt_words))
    return {
        "model": MODEL,
        "stream": True,
        "max_tokens": args.max_tokens,
        "messages": [
            {"role": "system", "content": document},
            {"role": "user", "content": f"question {i}: what does it say?"},
        ],
    }


async def _run(args: argparse.Namespace, roles: list[str]) -> tuple[RunStats, float]:
    fleet = Fleet()
    try:
        sims = []
        for role in roles:
            extra = ["--time-scale", "1.0", "--num-gpu-blocks", str(args.gpu_blocks)]
            sims.append(start_sim(MODEL, [*extra, "--role", role]))
        fleet.procs.extend(sims)
        await asyncio.gather(*(wait_ready(s.url, "/health") for s in sims))
        workers = [{"url": s.url, "role": r} for s, r in zip(sims, roles, strict=True)]
        config = {
            "listen": {"host": "127.0.0.1", "port": 0},
            "log_level": "warning",
            "auth": {"enabled": False},
            "health": {"interval_s": 0.5},
            "load_scrape": {"interval_s": 0.2},
            "pools": {MODEL: {"workers": workers}},
        }
        gateway = start_gateway_process(config)
        fleet.procs.append(gateway)
        await wait_ready(gateway.url, "/ready")
        stats = RunStats()
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            loop = asyncio.get_running_loop()
            start = loop.time()
            tasks = []
            for i in range(int(args.rate * args.seconds)):
                delay = start + i / args.rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(_one(session, gateway.url, _body(args, i), stats)))
            await asyncio.gather(*tasks)
            elapsed = loop.time() - start
        return stats, elapsed
    finally:
        fleet.stop()


async def _main(args: argparse.Namespace) -> int:
    decode = args.workers - args.prefill
    if args.prefill < 1 or decode < 1:
        raise SystemExit("--prefill must leave at least one decode worker")
    layouts = {
        f"aggregated ({args.workers} both)": ["both"] * args.workers,
        f"P/D ({args.prefill} prefill + {decode} decode)": ["prefill"] * args.prefill
        + ["decode"] * decode,
    }
    rows = []
    results = {}
    for name, roles in layouts.items():
        stats, elapsed = await _run(args, roles)
        ms = [1000 * x for x in stats.ttft_s]
        gaps = [1000 * x for x in stats.gaps_s]
        row = {
            "ttft_p50_ms": percentile(ms, 50),
            "ttft_p99_ms": percentile(ms, 99),
            "itl_p50_ms": percentile(gaps, 50),
            "itl_p99_ms": percentile(gaps, 99),
            "tokens_per_s": stats.tokens / elapsed,
            "errors": stats.errors,
        }
        results[name] = row
        rows.append([name, *(round(v, 1) for v in row.values())])
    print(
        f"\nP/D vs aggregated: {args.workers} workers, {args.rate:g} req/s for "
        f"{args.seconds:g}s, {args.documents or 'distinct'} documents x {args.prompt_words} words, "
        f"{args.max_tokens} tokens out"
    )
    print_table(["pool", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "tokens/s", "errors"], rows)
    write_json(args.json, {"args": vars(args), "results": results})
    return 1 if any(r["errors"] for r in results.values()) else 0


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prefix-router bench pd", description=__doc__)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--prefill", type=int, default=2)
    parser.add_argument("--rate", type=float, default=8.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument(
        "--documents", type=int, default=0, help="shared documents (0: every prompt its own)"
    )
    parser.add_argument("--prompt-words", type=int, default=3000)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--gpu-blocks", type=int, default=4096)
    parser.add_argument("--json", default="loadtest/results/pd.json")
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_main(args))
