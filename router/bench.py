"""Dispatch `prefix-router bench NAME` to the benchmark modules in `loadtest/`."""

from __future__ import annotations

import importlib

BENCHMARKS = {
    "overhead": "loadtest.bench_overhead",
    "routing": "loadtest.bench_routing",
    "index": "loadtest.bench_index",
    "soak": "loadtest.bench_soak",
    "precise": "loadtest.bench_precise",
    "routing-report": "loadtest.routing_charts",
}


def run_bench(name: str, argv: list[str]) -> int:
    module = importlib.import_module(BENCHMARKS[name])
    result: int = module.run(argv)
    return result
