"""`prefix-router demo`: the gateway in front of simulated workers, in one process.

No GPU, no Redis, no auth: the embedded default a newcomer runs first. Ctrl-C (or SIGTERM)
stops the gateway and every simulated worker it started.
"""

from __future__ import annotations

import asyncio
import signal

import uvloop

from router.config import parse_config
from router.serve import start_gateway
from workers.sim.config import SimConfig
from workers.sim.runner import SimHandle, start_sim_worker

DEMO_MODEL = "demo-llm"


async def _demo(port: int, workers: int) -> int:
    sims: list[SimHandle] = []
    try:
        for _ in range(workers):
            sims.append(await start_sim_worker(SimConfig(model=DEMO_MODEL, port=0)))
        config = parse_config(
            {
                "listen": {"host": "127.0.0.1", "port": port},
                "auth": {"enabled": False},
                "state": {"backend": "memory"},
                "debug_headers": True,
                "pools": {
                    DEMO_MODEL: {
                        "workers": [{"url": s.url} for s in sims],
                        "policy": {"name": "hybrid"},
                    }
                },
            }
        )
        runner, url = await start_gateway(config)
    except BaseException:
        for sim in sims:
            await sim.stop()
        raise
    print(f"\nprefix-router demo: gateway on {url} in front of {workers} simulated workers")
    print("  (in-memory state, no auth, no GPU). Ctrl-C stops everything.\n")
    print("Try:")
    print(
        f"  curl -sN {url}/v1/chat/completions -H 'Content-Type: application/json' "
        f'-d \'{{"model": "{DEMO_MODEL}", "stream": true, '
        f'"messages": [{{"role": "user", "content": "Hello there"}}]}}\'\n',
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        print("\nstopping the gateway and the simulated workers...", flush=True)
        await runner.cleanup()
        for sim in sims:
            await sim.stop()
    return 0


def run_demo(port: int = 8080, workers: int = 4) -> int:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_demo(port, workers))
