"""`prefix-worker sim --workers N` serves N independent simulated workers from one process:
each on its own port with its own cache and counters (a real subprocess)."""

from __future__ import annotations

import asyncio
import re
import sys

import aiohttp

from workers.sim.config import SimConfig
from workers.sim.runner import fleet_configs


def test_fleet_configs_count_ports_and_event_endpoints_up() -> None:
    base = SimConfig(
        model="m",
        port=9000,
        kv_events_endpoint="tcp://*:5557",
        kv_events_replay_endpoint="ipc:///tmp/replay",
    )
    configs = fleet_configs(base, 3)
    assert [c.port for c in configs] == [9000, 9001, 9002]
    assert [c.kv_events_endpoint for c in configs] == [
        "tcp://*:5557",
        "tcp://*:5558",
        "tcp://*:5559",
    ]
    assert configs[2].kv_events_replay_endpoint == "ipc:///tmp/replay-2"
    ephemeral = fleet_configs(base.model_copy(update={"port": 0}), 2)
    assert [c.port for c in ephemeral] == [0, 0]


async def test_one_process_serves_independent_workers(http: aiohttp.ClientSession) -> None:
    argv = [sys.executable, "-m", "workers", "sim", "--model", "m", "--workers", "4"]
    argv += ["--base-port", "0", "--time-scale", "0"]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        urls: list[str] = []
        while len(urls) < 4:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
            assert line, "the fleet exited before serving"
            urls += re.findall(r"serving on (http://\S+)", line.decode())
        assert len(set(urls)) == 4
        body = {"model": "m", "prompt": "one two three " * 40, "max_tokens": 2}
        for _ in range(2):
            async with http.post(urls[0] + "/v1/completions", json=body) as resp:
                assert resp.status == 200
        requests = []
        for url in urls:
            async with http.get(url + "/sim/counters") as resp:
                requests.append((await resp.json())["requests"])
        assert requests == [2, 0, 0, 0]  # each worker its own engine and counters
    finally:
        if proc.returncode is None:
            proc.terminate()
        code = await asyncio.wait_for(proc.wait(), timeout=10)
    assert code == 0  # SIGTERM stops every worker cleanly
