"""Stream migration under worker faults: how many streams the client sees break.

Eight simulated workers (processes) behind one gateway, streamed chat open loop at `--rate`
for `--seconds`. `--fault cut`: one worker cuts every stream after 3 chunks for the whole run;
`--fault kill`: three workers are SIGKILLed at once halfway through. Every response is
classified (`loadtest/outcomes.py`): whole, ended with an error event, failed before
streaming, or silently truncated; the gateway's `prefix_router_stream_migrations_total` is read
at the end. Run it with `--migrations 0` for the same run without migration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from collections import Counter

import aiohttp
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from loadtest.outcomes import SILENT_TRUNCATION, chat_outcome
from loadtest.procs import Fleet, start_gateway_process, start_sim, wait_ready
from loadtest.stats import print_table, write_json

MODEL = "migration-llm"


async def _one(session: aiohttp.ClientSession, url: str, i: int, outcomes: Counter[str]) -> None:
    body = {
        "model": MODEL,
        "stream": True,
        "max_tokens": 48,
        "messages": [{"role": "user", "content": f"conversation {i} " * 30}],
    }
    outcomes[await chat_outcome(session, url, body)] += 1


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
            "auth": {"enabled": False},
            "health": {"interval_s": 0.5},
            "pools": {
                MODEL: {"workers": [{"url": s.url} for s in sims], "migrations": args.migrations}
            },
        }
        gateway = start_gateway_process(config)
        fleet.procs.append(gateway)
        await wait_ready(gateway.url, "/ready")
        outcomes: Counter[str] = Counter()
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
                tasks.append(asyncio.create_task(_one(session, gateway.url, i, outcomes)))
            await asyncio.gather(*tasks)
            migrations = await _migrations(session, gateway.url)
        print(
            f"\nmigration: {args.workers} workers, {args.rate:g} req/s for {args.seconds:g}s, "
            f"fault {args.fault}, migrations {args.migrations}"
        )
        print_table(["outcome", "count"], sorted(outcomes.items()))
        print_table(["migration (cause/outcome)", "count"], sorted(migrations.items()))
        write_json(args.json, {"args": vars(args), "outcomes": outcomes, "migrations": migrations})
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
    parser.add_argument("--fault", choices=["cut", "kill"], default="cut")
    parser.add_argument("--migrations", type=int, default=2)
    parser.add_argument("--json", default="loadtest/results/migration.json")
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_main(args))
