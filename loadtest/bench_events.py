"""How many KV block events one gateway follows (`prefix-router bench events`).

It starts a redis-server, a simulated fleet (`--workers`, one process) and one gateway whose
pool routes in precise mode on the blocks the workers report. The benchmark then plays
`--workers` agents itself: it registers each worker the way `prefix-worker agent` does and writes
KV events into the pool's Redis stream in the agents' format (`router/state/keys.py`: stored
and removed entries of `--hashes` block hashes each, every worker's set kept bounded), at each
rate of a ladder for `--step-s` seconds, while a client sends the gateway `--request-rate`
streamed chats. Per step it reads the gateway's own counters: block events applied per second,
the lag from an entry's write to its application (p50/p99, from the stream entry ids), the
gateway's CPU, routing decision time p99, and the requests that failed. A step is sustained
when at least 95% of the offered events were applied and the lag p99 is at most 100 ms. It
ends with `ingested N block events/s`: the highest sustained rate.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections import deque
from typing import Any

import aiohttp
import redis.asyncio as aioredis
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from loadtest.gateway_probe import bucket_quantile
from loadtest.outcomes import chat_outcome
from loadtest.procs import (
    Fleet,
    cpu_seconds,
    start_gateway_process,
    start_redis,
    start_sim_fleet,
    wait_ready,
)
from loadtest.stats import print_table, write_json
from router.state.keys import HEARTBEAT_TTL_S, KV_STREAM_MAXLEN, Keys

MODEL = "events-llm"
KEYS = Keys()
LADDER = (25_000, 50_000, 100_000, 200_000, 400_000, 600_000, 800_000)


class Agents:
    """The fleet's agents as Redis sees them: registrations, load records, KV event entries."""

    def __init__(self, redis: aioredis.Redis, urls: list[str], hashes: int, held: int) -> None:
        self._redis = redis
        self._ids = [f"agent-{i}" for i in range(len(urls))]
        self._urls = urls
        self._hashes = hashes
        self._held = held  # entries of stored blocks each worker keeps before removing
        self._stored: list[deque[str]] = [deque() for _ in urls]
        self._rng = random.Random(7)
        self._next = 0

    async def register(self) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for agent, url in zip(self._ids, self._urls, strict=True):
            pipe.hset(
                KEYS.worker(agent),
                mapping={"url": url, "model": MODEL, "block_size": "16", "num_gpu_blocks": "65536"},
            )
            pipe.expire(KEYS.worker(agent), HEARTBEAT_TTL_S)
            pipe.hset(KEYS.load(agent), mapping={"running": "0", "waiting": "0", "ts": "0"})
            pipe.expire(KEYS.load(agent), HEARTBEAT_TTL_S)
            pipe.sadd(KEYS.workers(MODEL), agent)
        await pipe.execute()

    def _entry(self) -> tuple[str, dict[Any, Any]]:
        """The next entry and the stream it goes to (its worker's shard)."""
        worker = self._next % len(self._ids)
        self._next += 1
        stored = self._stored[worker]
        if len(stored) >= self._held:
            hashes, op = stored.popleft(), "removed"
        else:
            hashes = " ".join(str(self._rng.getrandbits(64)) for _ in range(self._hashes))
            stored.append(hashes)
            op = "stored"
        agent = self._ids[worker]
        entry = {"worker": agent, "op": op, "hashes": hashes, "parent": "", "seq": ""}
        return KEYS.kv_stream_of(MODEL, agent), entry

    async def publish(self, rate: float, seconds: float) -> int:
        """Write entries at `rate` block events per second for `seconds`; events written."""
        per_tick = rate * 0.01 / self._hashes
        owed = 0.0
        written = 0
        loop = asyncio.get_running_loop()
        start = loop.time()
        tick = 0
        while loop.time() - start < seconds:
            owed += per_tick
            count = int(owed)
            owed -= count
            if count:
                pipe = self._redis.pipeline(transaction=False)
                for _ in range(count):
                    stream, entry = self._entry()
                    pipe.xadd(stream, entry, maxlen=KV_STREAM_MAXLEN, approximate=True)
                await pipe.execute()
                written += count * self._hashes
            tick += 1
            delay = start + tick * 0.01 - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if tick % 200 == 0:
                await self.register()  # the heartbeat: registrations outlive the run
        return written


async def _metrics(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    out: dict[str, Any] = {"lag": {}, "decision": {}, "applied": 0.0}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "prefix_router_kv_events_applied_total":
                out["applied"] += s.value
            elif s.name == "prefix_router_kv_event_lag_seconds_bucket":
                out["lag"][float(s.labels["le"])] = s.value
            elif s.name == "prefix_router_routing_decision_seconds_bucket":
                le = float(s.labels["le"])
                out["decision"][le] = out["decision"].get(le, 0.0) + s.value
    return out


async def _client(session: aiohttp.ClientSession, url: str, rate: float, stop: asyncio.Event,
                  outcomes: dict[str, int]) -> None:  # fmt: skip
    tasks = []
    i = 0
    while not stop.is_set():
        body = {
            "model": MODEL,
            "stream": True,
            "max_tokens": 8,
            "messages": [{"role": "user", "content": f"request {i} " * 50}],
        }

        async def one(body: dict[str, Any] = body) -> None:
            outcome = await chat_outcome(session, url, body)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

        tasks.append(asyncio.create_task(one()))
        i += 1
        await asyncio.sleep(1 / rate)
    await asyncio.gather(*tasks)


async def _main(args: argparse.Namespace) -> int:
    fleet = Fleet()
    try:
        redis_proc = start_redis()
        fleet.procs.append(redis_proc)
        sims = start_sim_fleet(MODEL, args.workers, ["--time-scale", "0"])
        fleet.procs.append(sims[0])
        await asyncio.gather(*(wait_ready(s.url, "/health") for s in sims))
        config = {
            "listen": {"host": "127.0.0.1", "port": 0},
            "log_level": "warning",
            "auth": {"enabled": False},
            "health": {"interval_s": 1.0},
            "state": {"backend": "redis", "redis_url": redis_proc.url},
            "pools": {
                MODEL: {
                    "workers": [{"url": s.url} for s in sims],
                    "precise": {"tokenizer": "word"},
                }
            },
        }
        redis = aioredis.Redis.from_url(redis_proc.url)
        agents = Agents(redis, [s.url for s in sims], args.hashes, args.held)
        await agents.register()
        gateway = start_gateway_process(config)
        fleet.procs.append(gateway)
        await wait_ready(gateway.url, "/ready")
        await agents.publish(2000, 1.0)  # warm-up: the follower has mapped every agent
        rows, steps = [], []
        best = 0
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for rate in args.ladder:
                before = await _metrics(session, gateway.url)
                cpu0, t0 = cpu_seconds(gateway.pid), time.perf_counter()
                stop = asyncio.Event()
                outcomes: dict[str, int] = {}
                client = asyncio.create_task(
                    _client(session, gateway.url, args.request_rate, stop, outcomes)
                )
                written = await agents.publish(rate, args.step_s)
                await asyncio.sleep(0.5)  # the follower's last batch of this step
                stop.set()
                await client
                elapsed = time.perf_counter() - t0
                after = await _metrics(session, gateway.url)
                applied = after["applied"] - before["applied"]
                lag_p50 = 1000 * bucket_quantile(before["lag"], after["lag"], 0.5)
                lag_p99 = 1000 * bucket_quantile(before["lag"], after["lag"], 0.99)
                decision_p99 = 1e6 * bucket_quantile(before["decision"], after["decision"], 0.99)
                failed = sum(n for outcome, n in outcomes.items() if outcome != "ok")
                sustained = applied >= 0.95 * written and lag_p99 <= 100
                if sustained:
                    best = max(best, int(written / args.step_s))
                step = {
                    "offered_per_s": written / args.step_s,
                    "applied_per_s": applied / args.step_s,
                    "lag_p50_ms": lag_p50,
                    "lag_p99_ms": lag_p99,
                    "gateway_cpu": (cpu_seconds(gateway.pid) - cpu0) / elapsed,
                    "decision_p99_us": decision_p99,
                    "requests": sum(outcomes.values()),
                    "failed": failed,
                    "sustained": sustained,
                }
                steps.append(step)
                rows.append([round(v, 2) if isinstance(v, float) else v for v in step.values()])
                if not sustained and applied < 0.5 * written:
                    break  # far past what it follows: higher rates only take longer
        await redis.aclose()
        print(
            f"\nKV event ingestion: {args.workers} workers, {args.hashes} hashes per entry, "
            f"{args.step_s:g}s per step, {args.request_rate:g} req/s served meanwhile"
        )
        headers = ["offered/s", "applied/s", "lag p50 ms", "lag p99 ms", "gateway CPU",
                   "decision p99 us", "requests", "failed", "sustained"]  # fmt: skip
        print_table(headers, rows)
        write_json(args.json, {"args": vars(args), "steps": steps, "ingested_per_s": best})
        print(f"ingested {best} block events/s")
        return 0
    finally:
        fleet.stop()


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prefix-router bench events", description=__doc__)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--hashes", type=int, default=32, help="block hashes per stream entry")
    parser.add_argument("--held", type=int, default=64, help="entries each worker keeps stored")
    parser.add_argument("--step-s", type=float, default=8.0)
    parser.add_argument("--request-rate", type=float, default=20.0)
    parser.add_argument("--ladder", type=int, nargs="+", default=list(LADDER))
    parser.add_argument("--json", default="loadtest/results/events.json")
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_main(args))
