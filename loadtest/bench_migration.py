"""Stream migration under worker faults: how many streams the client sees break.

Eight simulated workers (processes) behind one gateway, streamed chat open loop at `--rate`
for `--seconds`. `--fault cut`: one worker cuts every stream after 3 chunks for the whole run;
`--fault kill`: three workers are SIGKILLed at once halfway through; `--fault none` is the
baseline. Every response is classified (`loadtest/outcomes.py`): whole, ended with an error
event, failed before streaming, or silently truncated; the gateway's
`prefix_router_stream_migrations_total` is read at the end. Streams stay streams: per stream the
client times the first content chunk (TTFT) and the longest pause between chunks (a migration's
seam shows there), for all streams and for those that began on a faulty worker. Run it with
`--migrations 0` for the same run without migration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from collections import Counter
from dataclasses import asdict, dataclass

import aiohttp
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from loadtest.outcomes import SILENT_TRUNCATION, error_code, stream_outcome
from loadtest.procs import Fleet, start_gateway_process, start_sim, wait_ready
from loadtest.stats import percentile, print_table, write_json

MODEL = "migration-llm"


@dataclass
class Timed:
    outcome: str
    worker: str = ""
    """The worker the stream began on (the gateway's debug header)."""
    ttft_s: float | None = None
    max_gap_s: float = 0.0


async def _one(session: aiohttp.ClientSession, url: str, i: int, results: list[Timed]) -> None:
    body = {
        "model": MODEL,
        "stream": True,
        "max_tokens": 48,
        "messages": [{"role": "user", "content": f"conversation {i} " * 30}],
    }
    clock = time.perf_counter  # uvloop's loop.time() counts whole milliseconds
    start = clock()
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                results.append(Timed(f"http_{resp.status}:{error_code(await resp.read())}"))
                return
            timed = Timed("", worker=resp.headers.get("X-Route-Worker", ""))
            raw, last = bytearray(), start
            async for chunk in resp.content.iter_any():
                now = clock()
                if b'"content"' in chunk and timed.ttft_s is None:
                    timed.ttft_s = now - start
                elif timed.ttft_s is not None:
                    timed.max_gap_s = max(timed.max_gap_s, now - last)
                last = now
                raw += chunk
    except (aiohttp.ClientError, TimeoutError) as exc:
        results.append(Timed(f"client:{type(exc).__name__}"))
        return
    timed.outcome = stream_outcome(bytes(raw))
    results.append(timed)


def _timing_rows(results: list[Timed], faulty: set[str]) -> list[list[object]]:
    rows: list[list[object]] = []
    for label, group in (
        ("all streams", results),
        ("began on a faulty worker", [r for r in results if r.worker in faulty]),
    ):
        ttft = [r.ttft_s for r in group if r.ttft_s is not None]
        gaps = [r.max_gap_s for r in group if r.ttft_s is not None]
        rows.append(
            [label, len(group), 1000 * percentile(ttft, 50), 1000 * percentile(ttft, 99),
             1000 * percentile(gaps, 50), 1000 * percentile(gaps, 99)]
        )  # fmt: skip
    return rows


async def _migrations(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    return {
        f"{s.labels['cause']}/{s.labels['outcome']}": s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "prefix_router_stream_migrations_total"
    }


async def _main(args: argparse.Namespace) -> int:
    fleet = Fleet()
    try:
        sims = [start_sim(MODEL, ["--time-scale", "1.0"]) for _ in range(args.workers)]
        fleet.procs.extend(sims)
        await asyncio.gather(*(wait_ready(s.url, "/health") for s in sims))
        config = {
            "listen": {"host": "127.0.0.1", "port": 0},
            "log_level": "warning",
            "debug_headers": True,
            "auth": {"enabled": False},
            "health": {"interval_s": 0.5},
            "pools": {
                MODEL: {"workers": [{"url": s.url} for s in sims], "migrations": args.migrations}
            },
        }
        gateway = start_gateway_process(config)
        fleet.procs.append(gateway)
        await wait_ready(gateway.url, "/ready")
        results: list[Timed] = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            if args.fault == "cut":
                fault = {"kind": "die_mid_stream", "after_tokens": 3, "count": 1_000_000}
                async with session.post(sims[0].url + "/sim/faults", json=fault) as resp:
                    assert resp.status == 200
            loop = asyncio.get_running_loop()
            start = loop.time()
            tasks = []
            total = int(args.rate * args.seconds)
            killed = False
            for i in range(total):
                delay = start + i / args.rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if args.fault == "kill" and not killed and i >= total // 2:
                    for sim in sims[:3]:
                        sim.popen.send_signal(signal.SIGKILL)
                    killed = True
                tasks.append(asyncio.create_task(_one(session, gateway.url, i, results)))
            await asyncio.gather(*tasks)
            migrations = await _migrations(session, gateway.url)
        outcomes = Counter(r.outcome for r in results)
        faulty = {f"{MODEL}/{n}" for n in {"cut": [0], "kill": [0, 1, 2], "none": []}[args.fault]}
        print(
            f"\nmigration: {args.workers} workers, {args.rate:g} req/s for {args.seconds:g}s, "
            f"fault {args.fault}, migrations {args.migrations}"
        )
        print_table(["outcome", "count"], sorted(outcomes.items()))
        print_table(["migration (cause/outcome)", "count"], sorted(migrations.items()))
        timing = _timing_rows(results, faulty)
        print_table(
            ["streams", "count", "TTFT p50 ms", "p99", "longest pause p50 ms", "p99"], timing
        )
        write_json(
            args.json,
            {
                "args": vars(args),
                "outcomes": outcomes,
                "migrations": migrations,
                "timing": timing,
                "streams": [asdict(r) for r in results],
            },
        )
        errors = sum(n for outcome, n in outcomes.items() if outcome.startswith("error_event"))
        print(json.dumps({"error_events": errors}))
        return 1 if outcomes[SILENT_TRUNCATION] else 0
    finally:
        fleet.stop()


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prefix-router bench migration", description=__doc__)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--rate", type=float, default=30.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--fault", choices=["cut", "kill", "none"], default="cut")
    parser.add_argument("--migrations", type=int, default=2)
    parser.add_argument("--json", default="loadtest/results/migration.json")
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_main(args))
