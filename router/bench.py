"""Dispatch `prefix-router bench NAME` to the benchmark modules in `loadtest/`."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "overhead": "loadtest.bench_overhead",
    "routing": "loadtest.bench_routing",
    "index": "loadtest.bench_index",
    "soak": "loadtest.bench_soak",
    "migration": "loadtest.bench_migration",
    "precise": "loadtest.bench_precise",
    "pd": "loadtest.bench_pd",
    "events": "loadtest.bench_events",
    "scale": "loadtest.bench_scale",
    "key-stall": "loadtest.bench_key_stall",
    "routing-report": "loadtest.routing_charts",
    "routing-regret": "loadtest.routing_regret",
}


INSTALL_HINT = (
    "the benchmarks are not installed here: pip install 'prefix-router[bench]' from a checkout "
    "of the repository (the production image carries only the gateway and worker tools)"
)


def run_bench(name: str, argv: list[str]) -> int:
    try:
        module = importlib.import_module(BENCHMARKS[name])
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith(("loadtest", "locust", "matplotlib")):
            raise
        print(f"prefix-router bench {name}: {INSTALL_HINT} (missing: {exc.name})", file=sys.stderr)
        return 2
    result: int = module.run(argv)
    return result
