"""Worker agents for a one-process simulated fleet, themselves in one process (benchmarks only).

`prefix-worker sim --workers N --base-port P` serves N workers on ports P.. with their KV events
on consecutive ports; production runs one agent beside each worker, but 64 agent processes would
cost this 2-core machine more than the fleet they follow. Here every agent is a real
`WorkerAgent` (the same subscriber, scraper and Redis writer), all on one event loop, until
SIGTERM. `start_agent_fleet` starts the process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

import uvloop

from loadtest.procs import Proc, spawn
from workers.agent.agent import WorkerAgent
from workers.agent.config import AgentConfig


def start_agent_fleet(
    redis_url: str, model: str, count: int, base_port: int, pub_base: int, replay_base: int
) -> Proc:
    """Agents `w0`..`w{count-1}` for the fleet on `base_port`.. publishing on `pub_base`.. and
    replaying on `replay_base`.."""
    args = [
        sys.executable, "-m", "loadtest.agent_fleet", "--redis", redis_url, "--model", model,
        "--count", str(count), "--base-port", str(base_port), "--pub-base", str(pub_base),
        "--replay-base", str(replay_base),
    ]  # fmt: skip
    return spawn(args, f"http://127.0.0.1:{base_port}", f"agents{base_port}")


async def _serve(args: argparse.Namespace) -> None:
    agents = [
        WorkerAgent(
            AgentConfig(
                vllm_url=f"http://127.0.0.1:{args.base_port + i}",
                kv_events_endpoint=f"tcp://127.0.0.1:{args.pub_base + i}",
                replay_endpoint=f"tcp://127.0.0.1:{args.replay_base + i}",
                redis_url=args.redis,
                worker_id=f"w{i}",
                model=args.model,
                interval_s=args.interval_s,
            )
        )
        for i in range(args.count)
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    for agent in agents:
        await agent.start()
    try:
        await stop.wait()
    finally:
        for agent in agents:
            await agent.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.agent_fleet")
    parser.add_argument("--redis", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--base-port", type=int, required=True)
    parser.add_argument("--pub-base", type=int, required=True)
    parser.add_argument("--replay-base", type=int, required=True)
    parser.add_argument("--interval-s", type=float, default=0.5)
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(args))


if __name__ == "__main__":
    main()
