"""Prefix index microbenchmark: routing decision time and memory per indexed block.

For each index backend and size (10k, 100k, 1M blocks over 8 workers) it fills a fresh hybrid
policy's index with a realistic mix (16 shared system prompts, documents of log-uniform length
from ~250 to ~16k tokens, a third of them growing conversations that extend an earlier
prompt), measuring the index's memory with tracemalloc. It then times, for 2k- and 16k-token
prompts that hit (an indexed prompt plus a follow-up) and miss (fresh text): the *decision*
(key -> block keys -> match -> TTFT scoring of 8 workers, DESIGN §10.8) and the full *pick*
(decision plus the speculative insert). Prints a table and writes JSON. Never a unit test.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from router.config import HybridPolicy, IndexConfig
from router.domain.calibration import CHARS_PER_TOKEN
from router.domain.policy import RoutingRequest
from router.domain.worker import Health, Worker
from router.routing.hybrid import HybridCost
from router.routing.key import estimate_prompt_tokens
from router.serve import GC_YOUNG_THRESHOLD

WORKERS = 8
PROMPT_TOKENS = (2_000, 16_000)


def _text(rng: random.Random, chars: int) -> str:
    return rng.randbytes(chars // 2 + 1).hex()[:chars]


def _request(key: str) -> RoutingRequest:
    return RoutingRequest(
        model="m", key=key, prompt_tokens=estimate_prompt_tokens(key), max_tokens=64
    )


def _fill(policy: HybridCost, workers: list[Worker], target: int, rng: random.Random) -> int:
    """Insert the prompt mix until the index holds ~`target` blocks; returns prompts inserted."""
    index = policy.index
    systems = [_text(rng, rng.randint(1_000, 8_000)) for _ in range(16)]
    recent: list[str] = []
    prompts = 0
    while index.stats().blocks < target * 0.98:
        if recent and rng.random() < 0.33:
            base = rng.choice(recent) + _text(rng, rng.randint(200, 2_000))
        else:
            chars = int(1_000 * 64 ** rng.random())
            base = rng.choice(systems) + _text(rng, chars)
        base = base[: 16_000 * CHARS_PER_TOKEN]
        index.insert(rng.choice(workers).id, index.block_keys(base))
        recent.append(base)
        if len(recent) > 64:
            recent.pop(rng.randrange(len(recent)))
        prompts += 1
    return prompts


def _percentiles(samples: list[float]) -> tuple[float, float]:
    samples.sort()
    return samples[len(samples) // 2] * 1e6, samples[int(len(samples) * 0.99)] * 1e6


def _time(
    make: Callable[[int], RoutingRequest], fn: Callable[[RoutingRequest], object], rounds: int
) -> tuple[float, float]:
    """Percentiles of `fn(make(i))`, building each request outside the timed region."""
    samples = []
    clock = time.perf_counter
    for i in range(rounds):
        request = make(i)
        t0 = clock()
        fn(request)
        samples.append(clock() - t0)
    return _percentiles(samples)


def bench_one(
    backend: str, target: int, rounds: int, seed: int, dense_blocks: int = 16
) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    workers = [
        Worker(id=f"w{i}", url=f"http://w{i}", pool="bench", health=Health.HEALTHY)
        for i in range(WORKERS)
    ]
    for i, w in enumerate(workers):
        w.in_flight = i % 3
        w.prefill_backlog_tokens = 500 * (i % 4)
    config = IndexConfig(
        backend=backend,
        default_capacity_blocks=max(1, target * 3 // (2 * WORKERS)),
        max_blocks_total=target,
        dense_blocks=dense_blocks,
    )
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    policy = HybridCost(HybridPolicy(), config, random.Random(seed))
    fill_t0 = time.perf_counter()
    prompts = _fill(policy, workers, target, rng)
    fill_s = time.perf_counter() - fill_t0
    gc.collect()
    index_bytes = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    stats = policy.index.stats()
    # Timed under the gateway's own collector settings (`serve.settle_gc`): at CPython's
    # default a young collection lands every few decisions and sets their p99.
    saved = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *saved[1:])
    row = {
        "backend": backend,
        "dense_blocks": dense_blocks,
        "target_blocks": target,
        "blocks": stats.blocks,
        "entries": stats.entries,
        "prompts_filled": prompts,
        "fill_s": round(fill_s, 2),
        "bytes_per_block": round(index_bytes / max(1, stats.blocks), 1),
        "bytes_per_entry": round(index_bytes / max(1, stats.entries), 1),
    }
    try:
        return _time_cases(policy, workers, rng, rounds, row)
    finally:
        gc.set_threshold(*saved)


def _time_cases(
    policy: HybridCost,
    workers: list[Worker],
    rng: random.Random,
    rounds: int,
    index_row: dict[str, Any],
) -> list[dict[str, Any]]:
    """Decision and pick percentiles for hit and miss prompts of each size."""
    rows = []
    for tokens in PROMPT_TOKENS:
        chars = tokens * CHARS_PER_TOKEN
        hits = []
        for _ in range(16):
            doc = _text(rng, chars)
            policy.index.insert(rng.choice(workers).id, policy.index.block_keys(doc))
            hits.append(doc)
        body = _text(rng, chars)

        def hit(i: int, hits: list[str] = hits) -> RoutingRequest:
            return _request(hits[i % len(hits)] + f" follow-up {i}")

        def miss(i: int, body: str = body) -> RoutingRequest:
            # A distinct first block makes every chained key new: a true miss every round.
            return _request(f"{i:08d}" + _text(rng, 56) + body)

        for case, make in (("hit", hit), ("miss", miss)):
            d50, d99 = _time(make, lambda r: policy.estimate(r, workers), rounds)
            p50, p99 = _time(make, lambda r: policy.pick(r, workers), rounds)
            rows.append(
                {
                    **index_row,
                    "prompt_tokens": tokens,
                    "case": case,
                    "decision_p50_us": round(d50, 1),
                    "decision_p99_us": round(d99, 1),
                    "pick_p50_us": round(p50, 1),
                    "pick_p99_us": round(p99, 1),
                }
            )
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'backend':8} {'blocks':>9} {'entries':>8} {'B/block':>8} {'B/entry':>8} "
        f"{'tokens':>6} {'case':5} {'dec p50':>8} {'dec p99':>8} {'pick p50':>9} {'pick p99':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['backend']:8} {r['blocks']:>9} {r['entries']:>8} {r['bytes_per_block']:>8} "
            f"{r['bytes_per_entry']:>8} {r['prompt_tokens']:>6} {r['case']:5} "
            f"{r['decision_p50_us']:>8} {r['decision_p99_us']:>8} "
            f"{r['pick_p50_us']:>9} {r['pick_p99_us']:>9}"
        )
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="prefix-router bench index", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, few rounds (seconds)")
    parser.add_argument("--sizes", type=int, nargs="+", help="indexed block counts to test")
    parser.add_argument("--backends", nargs="+", default=["flat", "pygtrie"])
    parser.add_argument("--rounds", type=int, help="timed decisions per case")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--dense-blocks", type=int, default=16, help="IndexConfig.dense_blocks (huge = every block)"
    )
    parser.add_argument("--json", default="loadtest/results/index.json", help="output path")
    args = parser.parse_args(argv)
    sizes = args.sizes or ([10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000])
    rounds = args.rounds or (200 if args.quick else 2_000)

    rows: list[dict[str, Any]] = []
    for backend in args.backends:
        for size in sizes:
            rows.extend(bench_one(backend, size, rounds, args.seed, args.dense_blocks))
    print(_table(rows))
    print("times in µs; decision = keys+match+scoring of 8 workers; pick adds the insert")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"python": platform.python_version(), "machine": platform.machine(), "rounds": rounds}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
