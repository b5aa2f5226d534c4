"""Gateway overhead benchmark: the latency the gateway adds to small streamed requests.

Sends small streamed chat requests open-loop at fixed rates, first straight to a simulated
worker, then through a gateway in front of that same worker, and prints the added TTFT
(p50/p99 of gateway minus direct), errors, achieved rate and the gateway's CPU per 1000
requests. Simulated worker and gateway are separate processes (`--target` measures a gateway
that is already running instead; give `--direct` for its worker).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp
import uvloop

from loadtest.procs import Fleet, cpu_seconds, start_gateway_process, start_sim, wait_ready
from loadtest.stats import percentile, print_table, write_json

MODEL = "bench-llm"


@dataclass
class Phase:
    ttft_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)
    errors: int = 0
    sent: int = 0
    elapsed_s: float = 0.0


async def _one(session: aiohttp.ClientSession, url: str, body: bytes, phase: Phase) -> None:
    started = time.perf_counter()
    try:
        async with session.post(
            url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
        ) as resp:
            if resp.status != 200:
                phase.errors += 1
                await resp.read()
                return
            first = await resp.content.readany()
            ttft = time.perf_counter() - started
            tail = first
            while chunk := await resp.content.readany():
                tail = chunk
            if not tail.rstrip().endswith(b"[DONE]"):
                phase.errors += 1
                return
            phase.ttft_s.append(ttft)
            phase.e2e_s.append(time.perf_counter() - started)
    except (aiohttp.ClientError, TimeoutError):
        phase.errors += 1


async def run_phase(url: str, rate: float, duration_s: float, max_tokens: int) -> Phase:
    phase = Phase()
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # Warm the connection pool so the measured phase is steady state.
        warm = [_one(session, url, _body(i, max_tokens), Phase()) for i in range(50)]
        await asyncio.gather(*warm)
        total = int(rate * duration_s)
        tasks = []
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(total):
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(session, url, _body(i, max_tokens), phase)))
            phase.sent += 1
        await asyncio.gather(*tasks)
        phase.elapsed_s = loop.time() - start
    return phase


def _body(i: int, max_tokens: int) -> bytes:
    text = f"request {i} please answer briefly about the weather in city number {i % 97}"
    return json.dumps(
        {
            "model": MODEL,
            "stream": True,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": text}],
        }
    ).encode()


async def _main(args: argparse.Namespace) -> int:
    fleet = Fleet()
    gateway_pid: int | None = None
    try:
        if args.target:
            gateway_url, direct_url = args.target.rstrip("/"), args.direct
        else:
            sim = start_sim(MODEL, ["--time-scale", "0"])
            fleet.procs.append(sim)
            await wait_ready(sim.url, "/health")
            config = {
                "listen": {"host": "127.0.0.1", "port": 0},
                "log_level": "warning",
                "auth": {"enabled": False},
                "pools": {MODEL: {"workers": [{"url": sim.url}], "policy": {"name": args.policy}}},
            }
            gateway = start_gateway_process(config)
            fleet.procs.append(gateway)
            await wait_ready(gateway.url, "/ready")
            gateway_url, direct_url, gateway_pid = gateway.url, sim.url, gateway.pid
        rows = []
        results = []
        for rate in args.rates:
            direct = (
                await run_phase(direct_url, rate, args.duration, args.max_tokens)
                if (direct_url)
                else Phase()
            )
            cpu0 = cpu_seconds(gateway_pid) if gateway_pid else 0.0
            via = await run_phase(gateway_url, rate, args.duration, args.max_tokens)
            cpu_ms = (cpu_seconds(gateway_pid) - cpu0) * 1000 if gateway_pid else float("nan")
            added50 = (percentile(via.ttft_s, 50) - percentile(direct.ttft_s, 50)) * 1000
            added99 = (percentile(via.ttft_s, 99) - percentile(direct.ttft_s, 99)) * 1000
            per_1000 = cpu_ms / max(1, via.sent) * 1000
            row = {
                "rate": rate,
                "achieved_rps": via.sent / via.elapsed_s if via.elapsed_s else 0.0,
                "direct_ttft_p50_ms": percentile(direct.ttft_s, 50) * 1000,
                "direct_ttft_p99_ms": percentile(direct.ttft_s, 99) * 1000,
                "gateway_ttft_p50_ms": percentile(via.ttft_s, 50) * 1000,
                "gateway_ttft_p99_ms": percentile(via.ttft_s, 99) * 1000,
                "added_p50_ms": added50,
                "added_p99_ms": added99,
                "errors": via.errors + direct.errors,
                "gateway_cpu_ms_per_1000": per_1000,
            }
            results.append(row)
            rows.append(
                [
                    rate,
                    row["achieved_rps"],
                    row["direct_ttft_p50_ms"],
                    row["gateway_ttft_p50_ms"],
                    added50,
                    added99,
                    row["errors"],
                    per_1000,
                ]
            )
        print(
            f"\ngateway overhead, streamed chat, {args.max_tokens} tokens, "
            f"{args.duration:.0f}s per rate, policy {args.policy}"
        )
        print_table(
            [
                "req/s",
                "achieved",
                "direct p50 ms",
                "gateway p50 ms",
                "added p50 ms",
                "added p99 ms",
                "errors",
                "gw CPU ms/1000 req",
            ],
            rows,
        )
        write_json(args.json, {"policy": args.policy, "rows": results})
        return 1 if any(r["errors"] for r in results) else 0
    finally:
        fleet.stop()


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prefix-router bench overhead", description=__doc__)
    parser.add_argument("--rates", type=float, nargs="+", default=[200, 500, 1000])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per rate")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--policy", default="hybrid")
    parser.add_argument("--target", help="an already running gateway URL")
    parser.add_argument("--direct", help="with --target: its worker's URL, for the baseline")
    parser.add_argument("--json", default="loadtest/results/overhead.json")
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_main(args))
