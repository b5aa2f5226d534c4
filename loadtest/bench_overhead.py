"""Gateway overhead benchmark: what each router adds to small streamed requests, side by side.

One run, one fleet of simulated workers of near-zero cost, and in front of it, one after the
other at each rate: nothing (the client round-robins over the workers: the baseline), a plain
aiohttp streaming proxy (`loadtest/plain_proxy.py`, the least a Python relay costs), the gateway
with its defaults (hybrid routing, metrics, one access-log line per request), and every
`--router-cmd`. Requests alternate small streamed chat and text completions, open loop. For
each target and rate it reports E2E and TTFT added over direct (p50/p99), the router's CPU per
request (from /proc), errors, and the achieved rate; and per target the highest rate it
sustained (at most 0.5% errors, at least 95% of the offered rate, E2E p99 at most 100 ms).
`--repeat N` runs it all N times and reports the medians. `--profile DIR` samples the gateway
and the plain proxy with py-spy during each of their phases (`DIR/<target>-<rate>.txt`, collapsed
stacks for a flame graph; `py-spy` is in the bench extra).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import uvloop

from loadtest.external_router import parse_routers, start_external, wait_external
from loadtest.procs import (
    Fleet,
    cpu_seconds,
    free_port,
    spawn,
    start_gateway_process,
    start_sim,
    wait_ready,
)
from loadtest.stats import percentile, print_table, write_json

MODEL = "bench-llm"
Table = dict[tuple[str, float], dict[str, float]]
PROFILED = ("plain-proxy", "prefix-router")
SUSTAINED = {"max_error_share": 0.005, "min_achieved_share": 0.95, "max_e2e_p99_ms": 100.0}


@dataclass
class Phase:
    ttft_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)
    errors: int = 0
    sent: int = 0
    elapsed_s: float = 0.0
    cpu_s: float = float("nan")


@dataclass
class Target:
    name: str
    urls: list[str]
    """One URL for a router; every worker's for direct (the client round-robins)."""
    pid: int | None = None


def _request(i: int, max_tokens: int) -> tuple[str, bytes]:
    text = f"request {i} please answer briefly about the weather in city number {i % 97}"
    if i % 2:
        body = {"model": MODEL, "stream": True, "max_tokens": max_tokens, "prompt": text}
        return "/v1/completions", json.dumps(body).encode()
    messages = [{"role": "user", "content": text}]
    body = {"model": MODEL, "stream": True, "max_tokens": max_tokens, "messages": messages}
    return "/v1/chat/completions", json.dumps(body).encode()


async def _one(session: aiohttp.ClientSession, url: str, i: int, tokens: int, ph: Phase) -> None:
    path, body = _request(i, tokens)
    started = time.perf_counter()
    try:
        headers = {"Content-Type": "application/json"}
        async with session.post(url + path, data=body, headers=headers) as resp:
            if resp.status != 200:
                ph.errors += 1
                await resp.read()
                return
            tail = await resp.content.readany()
            ttft = time.perf_counter() - started
            while chunk := await resp.content.readany():
                tail = chunk
            if not tail.rstrip().endswith(b"[DONE]"):
                ph.errors += 1
                return
            ph.ttft_s.append(ttft)
            ph.e2e_s.append(time.perf_counter() - started)
    except (aiohttp.ClientError, TimeoutError):
        ph.errors += 1


async def run_phase(target: Target, rate: float, duration_s: float, tokens: int) -> Phase:
    phase = Phase()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=30)
    urls = target.urls
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # Warm connection pools and caches so the measured phase is steady state.
        await asyncio.gather(
            *(_one(session, urls[i % len(urls)], i, tokens, Phase()) for i in range(50))
        )
        total = int(rate * duration_s)
        tasks = []
        loop = asyncio.get_running_loop()
        cpu0 = cpu_seconds(target.pid) if target.pid else 0.0
        start = loop.time()
        for i in range(total):
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            url = urls[i % len(urls)]
            tasks.append(asyncio.create_task(_one(session, url, i, tokens, phase)))
            phase.sent += 1
        await asyncio.gather(*tasks)
        phase.elapsed_s = loop.time() - start
        if target.pid:
            phase.cpu_s = cpu_seconds(target.pid) - cpu0
    return phase


def _row(phase: Phase, direct: Phase, rate: float) -> dict[str, float]:
    def ms(values: list[float], q: float) -> float:
        return percentile(values, q) * 1000 if values else float("nan")

    return {
        "achieved_rps": phase.sent / phase.elapsed_s if phase.elapsed_s else 0.0,
        "offered_rps": rate,
        "error_share": phase.errors / max(1, phase.sent),
        "e2e_p50_ms": ms(phase.e2e_s, 50),
        "e2e_p99_ms": ms(phase.e2e_s, 99),
        "added_e2e_p50_ms": ms(phase.e2e_s, 50) - ms(direct.e2e_s, 50),
        "added_e2e_p99_ms": ms(phase.e2e_s, 99) - ms(direct.e2e_s, 99),
        "added_ttft_p50_ms": ms(phase.ttft_s, 50) - ms(direct.ttft_s, 50),
        "added_ttft_p99_ms": ms(phase.ttft_s, 99) - ms(direct.ttft_s, 99),
        "cpu_ms_per_request": phase.cpu_s * 1000 / max(1, phase.sent),
    }


def _sustained(row: dict[str, float]) -> bool:
    return (
        row["error_share"] <= SUSTAINED["max_error_share"]
        and row["achieved_rps"] >= SUSTAINED["min_achieved_share"] * row["offered_rps"]
        and row["e2e_p99_ms"] <= SUSTAINED["max_e2e_p99_ms"]
    )


def _medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(run[k] for run in runs) for k in runs[0]}


async def _start_targets(args: argparse.Namespace, fleet: Fleet) -> list[Target]:
    sims = [start_sim(MODEL, ["--time-scale", str(args.time_scale)]) for _ in range(args.workers)]
    fleet.procs.extend(sims)
    await asyncio.gather(*(wait_ready(s.url, "/health") for s in sims))
    urls = [s.url for s in sims]
    port = free_port()
    plain = spawn(
        [sys.executable, "-m", "loadtest.plain_proxy", "--port", str(port), *urls],
        f"http://127.0.0.1:{port}",
        f"plain{port}",
    )
    fleet.procs.append(plain)
    # The gateway with its defaults: access log and metrics on; the log goes to its log file.
    config = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "auth": {"enabled": False},
        "pools": {MODEL: {"workers": [{"url": u} for u in urls], "policy": {"name": args.policy}}},
    }
    gateway = start_gateway_process(config)
    fleet.procs.append(gateway)
    targets = [
        Target("direct", urls),
        Target("plain-proxy", [plain.url], plain.pid),
        Target("prefix-router", [gateway.url], gateway.pid),
    ]
    await wait_external(plain, MODEL)
    await wait_ready(gateway.url, "/ready")
    for name, cmd in parse_routers(args.router_cmd, args.router_name):
        proc = start_external(cmd, urls, MODEL)
        fleet.procs.append(proc)
        await wait_external(proc, MODEL)
        targets.append(Target(name, [proc.url], proc.pid))
    return targets


async def _main(args: argparse.Namespace) -> int:
    fleet = Fleet()
    try:
        targets = await _start_targets(args, fleet)
        runs: dict[tuple[str, float], list[dict[str, float]]] = {}
        for _ in range(args.repeat):
            for rate in args.rates:
                direct = await run_phase(targets[0], rate, args.duration, args.max_tokens)
                runs.setdefault(("direct", rate), []).append(_row(direct, direct, rate))
                for target in targets[1:]:
                    profiler = _profile(args, target, rate)
                    phase = await run_phase(target, rate, args.duration, args.max_tokens)
                    if profiler is not None:
                        profiler.wait()
                    runs.setdefault((target.name, rate), []).append(_row(phase, direct, rate))
        table = {key: _medians(rows) for key, rows in runs.items()}
        _print(args, targets, table)
        write_json(
            args.json,
            {
                "repeat": args.repeat,
                "criteria": SUSTAINED,
                "rows": [{"target": t, "rate": r, **row} for (t, r), row in table.items()],
            },
        )
        return 0
    finally:
        fleet.stop()


def _profile(
    args: argparse.Namespace, target: Target, rate: float
) -> subprocess.Popen[bytes] | None:
    """py-spy sampling the gateway or the plain proxy for the phase about to run (with
    `--profile`; the two Python targets, so their profiles can be compared)."""
    if args.profile is None or target.name not in PROFILED or target.pid is None:
        return None
    py_spy = _py_spy()
    assert py_spy is not None  # run() checked
    out = Path(args.profile) / f"{target.name}-{rate:g}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [py_spy, "record", "--pid", str(target.pid), "--format", "raw", "--rate", "250"]
    command += ["--duration", str(max(1, int(args.duration))), "--nonblocking", "-o", str(out)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


def _print(
    args: argparse.Namespace,
    targets: list[Target],
    table: dict[tuple[str, float], dict[str, float]],
) -> None:
    print(
        f"\noverhead: {args.workers} simulated workers, streamed chat and completions, "
        f"{args.max_tokens} tokens, worker time scale {args.time_scale:g}, "
        f"{args.duration:.0f}s per rate, medians of {args.repeat} run(s)"
    )
    rows = []
    for target in targets:
        for rate in args.rates:
            r = table[(target.name, rate)]
            rows.append(
                [
                    target.name, rate, r["achieved_rps"], f"{r['error_share']:.2%}",
                    r["added_e2e_p50_ms"], r["added_e2e_p99_ms"],
                    r["added_ttft_p50_ms"], r["added_ttft_p99_ms"], r["cpu_ms_per_request"],
                ]
            )  # fmt: skip
    headers = ["target", "req/s", "achieved", "errors", "+E2E p50 ms", "+E2E p99 ms"]
    print_table([*headers, "+TTFT p50 ms", "+TTFT p99 ms", "CPU ms/req"], rows)
    for target in targets:
        ok = [rate for rate in args.rates if _sustained(table[(target.name, rate)])]
        print(f"{target.name}: highest sustained rate {max(ok) if ok else 'none'} req/s")


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prefix-router bench overhead", description=__doc__)
    parser.add_argument("--rates", type=float, nargs="+", default=[200, 500, 1000])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per rate")
    parser.add_argument("--repeat", type=int, default=1, help="runs; medians are reported")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--policy", default="hybrid")
    parser.add_argument(
        "--time-scale",
        type=float,
        default=0.0,
        help="the workers' pace (0: no model time, tokens come in bursts; 0.2: one by one)",
    )
    parser.add_argument("--router-cmd", action="append", help="an external router (template)")
    parser.add_argument("--router-name", action="append", help="its name in the table")
    parser.add_argument("--json", default="loadtest/results/overhead.json")
    parser.add_argument("--profile", default=None, help="py-spy the gateway; stacks to this dir")
    args = parser.parse_args(argv)
    if args.profile is not None and _py_spy() is None:
        parser.error("--profile needs py-spy: pip install 'prefix-router[bench]' (or py-spy)")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_main(args))
