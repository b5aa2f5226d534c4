"""Soak benchmark: steady load through the gateway while workers fail at random.

Simulated workers run with seeded probabilistic faults (5xx, refused connections, hangs,
deaths mid-stream, stalls, slow tokens) and one worker is killed and restarted every
`--restart-every-s`. Every response is classified; a response that ended without `[DONE]` and
without an error event (a silent truncation) makes the run fail.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import time
from collections import Counter

import aiohttp
import uvloop

from loadtest.gateway_probe import migration_outcomes
from loadtest.outcomes import SILENT_TRUNCATION, chat_outcome
from loadtest.procs import Fleet, Proc, start_gateway_process, start_sim, wait_ready
from loadtest.stats import print_table, write_json

MODEL = "soak-llm"


def _fault_args(probability: float, seed: int) -> list[str]:
    p = probability
    rules = [
        f"status:status=503,probability={p}",
        f"status:status=500,probability={p / 2}",
        f"refuse:probability={p / 2}",
        f"die_mid_stream:after_tokens=3,probability={p}",
        f"stall_between_tokens:after_tokens=2,stall_s=0.5,probability={p}",
        f"slow_tokens:factor=3,probability={p}",
        f"hang_before_first_byte:probability={p / 4}",
    ]
    args = []
    for rule in rules:
        args += ["--fault", rule]
    return [*args, "--fault-seed", str(seed), "--time-scale", "0.2"]


async def _one(
    session: aiohttp.ClientSession, url: str, i: int, stream: bool, outcomes: Counter[str]
) -> None:
    body = {
        "model": MODEL,
        "stream": stream,
        "max_tokens": 32,
        "messages": [{"role": "user", "content": f"soak request {i % 500} " * 8}],
    }
    outcomes[await chat_outcome(session, url, body)] += 1


async def _restarter(sims: list[Proc], args: argparse.Namespace, stop: asyncio.Event) -> int:
    rng = random.Random(args.seed)
    restarts = 0
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), args.restart_every_s)
            break
        except TimeoutError:
            pass
        k = rng.randrange(len(sims))
        victim = sims[k]
        victim.popen.send_signal(signal.SIGKILL)
        victim.popen.wait()
        await asyncio.sleep(2.0)  # the worker stays down for a while, as a crashed pod does
        port = int(victim.url.rsplit(":", 1)[1])
        sims[k] = start_sim(MODEL, _fault_args(args.fault_prob, args.seed + restarts + 1), port)
        restarts += 1
    return restarts


async def _main(args: argparse.Namespace) -> int:
    fleet = Fleet()
    try:
        sims = [
            start_sim(MODEL, _fault_args(args.fault_prob, args.seed + i))
            for i in range(args.workers)
        ]
        fleet.procs.extend(sims)
        await asyncio.gather(*(wait_ready(s.url, "/health") for s in sims))
        config = {
            "listen": {"host": "127.0.0.1", "port": 0},
            "log_level": args.log_level,
            "auth": {"enabled": False},
            "health": {"interval_s": 1.0, "timeout_s": 1.0},
            "timeouts": {"connect_s": 1, "first_byte_s": 3, "idle_s": 3, "total_s": 60},
            "pools": {MODEL: {"workers": [{"url": s.url} for s in sims]}},
        }
        gateway = start_gateway_process(config)
        fleet.procs.append(gateway)
        await wait_ready(gateway.url, "/ready")

        outcomes: Counter[str] = Counter()
        stop = asyncio.Event()
        restarter = asyncio.create_task(_restarter(sims, args, stop))
        rng = random.Random(args.seed)
        duration_s = args.minutes * 60
        timeout = aiohttp.ClientTimeout(total=90)
        started = time.monotonic()
        async with aiohttp.ClientSession(timeout=timeout) as session:
            tasks: set[asyncio.Task[None]] = set()
            i = 0
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            while loop.time() - t0 < duration_s:
                delay = t0 + i / args.rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(
                    _one(session, gateway.url, i, rng.random() < 0.8, outcomes)
                )
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
            stop.set()
            await asyncio.gather(*tasks)
        restarts = await restarter
        migrations = await migration_outcomes(gateway.url)
        fleet.procs[: len(sims)] = sims
        elapsed = time.monotonic() - started
        total = sum(outcomes.values())
        failures = {k: v for k, v in outcomes.items() if k != "ok"}
        print(
            f"\nsoak: {elapsed:.0f}s, {args.workers} workers, fault probability "
            f"{args.fault_prob} per rule, {restarts} worker kills/restarts"
        )
        rows: list[list[object]] = [["requests", total], ["ok", outcomes["ok"]]]
        rows += [[k, v] for k, v in sorted(failures.items())]
        rows.append(["silent truncations", outcomes[SILENT_TRUNCATION]])
        print_table(["outcome", "count"], rows)
        # What became of every broken stream: "migrated", or why not ("limit": it broke more
        # often than the pool's `migrations`; "failed": no other worker gave a first byte).
        print_table(
            ["broken stream", "count"], [[k, int(v)] for k, v in sorted(migrations.items())]
        )
        write_json(
            args.json,
            {
                "seconds": elapsed,
                "restarts": restarts,
                "outcomes": outcomes,
                "migrations": migrations,
            },
        )
        return 1 if outcomes[SILENT_TRUNCATION] else 0
    finally:
        fleet.stop()


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prefix-router bench soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--rate", type=float, default=40.0, help="requests per second")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--fault-prob", type=float, default=0.02)
    parser.add_argument("--restart-every-s", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--log-level", default="warning", help="the gateway's (info logs every migration)"
    )
    parser.add_argument("--json", default="loadtest/results/soak.json")
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_main(args))
