"""Fleet-size benchmark: hybrid routing at 8, 16, 32 and 64 simulated workers, behind one gateway
and behind 4 replicas sharing one Redis (the scale issue, point 3).

Each cell is one `bench routing` row (same workloads, caches sized below the working set, workers
reporting their capacity; fleets above 8 run as one `prefix-worker sim --workers N` process). It
prints, per workload, fleet size and replica count: the fleet's hit rate and its difference from
one replica, TTFT p50/p99, imbalance, errors, the gateways' routing decision time (p50/p99, the
upper bound of the histogram bucket holding it) and their CPU per request (all replicas' CPU over
all requests, background loops included), and writes the table as JSON. Every process shares
this machine's cores: the host CPU column says when a cell measured starvation.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import uvloop

from loadtest.bench_routing import build_parser, run_workload
from loadtest.stats import print_table, write_json

SIZES = (8, 16, 32, 64)
COLUMNS = [
    ("workload", "workload"),
    ("workers", "workers"),
    ("replicas", "replicas"),
    ("hit_rate", "hit rate"),
    ("hit_delta_points", "vs 1 replica (points)"),
    ("ttft_p50_ms", "TTFT p50 ms"),
    ("ttft_p99_ms", "p99"),
    ("imbalance", "imbalance"),
    ("errors", "errors"),
    ("decision_p50_us", "decision p50 us"),
    ("decision_p99_us", "p99"),
    ("router_cpu_ms_per_request", "gateway CPU ms/req"),
    ("machine_busy", "host CPU"),
]


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prefix-router bench scale", description=__doc__)
    parser.add_argument("--workloads", nargs="+", default=["shared", "multiturn"])
    parser.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    parser.add_argument("--replicas", type=int, default=4, help="besides one replica")
    parser.add_argument("--quick", action="store_true", help="a fifth of the requests")
    parser.add_argument("--json", default="loadtest/results/scale.json")
    args = parser.parse_args(argv)

    async def main() -> int:
        cells: list[dict[str, Any]] = []
        for workload in args.workloads:
            for size in args.sizes:
                single: float | None = None
                for replicas in (1, args.replicas):
                    routing = build_parser().parse_args(
                        ["--workload", workload, "--policies", "hybrid", "--workers", str(size),
                         "--replicas", str(replicas), *(["--quick"] if args.quick else []),
                         "--json", f"/tmp/prefix-router-scale-{workload}-{size}x{replicas}.json",
                         "--png", f"/tmp/prefix-router-scale-{workload}-{size}x{replicas}.png"]
                    )  # fmt: skip
                    (row,) = (await run_workload(workload, routing))["rows"]
                    single = row["hit_rate"] if replicas == 1 else single
                    delta = 100 * (row["hit_rate"] - single) if single is not None else 0.0
                    cells.append(
                        {**row, "workload": workload, "workers": size, "replicas": replicas,
                         "hit_delta_points": delta}
                    )  # fmt: skip
        print("\nhybrid routing by fleet size and gateway replicas")
        print_table([h for _, h in COLUMNS], [[c[k] for k, _ in COLUMNS] for c in cells])
        worst = max((abs(c["hit_delta_points"]) for c in cells if c["replicas"] > 1), default=0.0)
        print(f"largest hit-rate difference between {args.replicas} replicas and one: "
              f"{worst:.1f} points (bound: 1 at 8 workers, 2 at 64)")  # fmt: skip
        write_json(args.json, {"cells": cells, "replicas": args.replicas})
        return 1 if any(c["errors"] for c in cells) else 0

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())
