"""Config reload (validate first, swap atomically) and graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import yaml

from router.config import parse_config
from router.http.context import STATE
from router.serve import start_gateway
from tests.conftest import MODEL, SimFactory, chat_body, gateway_config, wait_for
from tests.sse import read_events


def _config_dict(urls: list[str], **pool: object) -> dict[str, object]:
    return {
        "listen": {"host": "127.0.0.1", "port": 0},
        "auth": {"enabled": False},
        "health": {"interval_s": 0.2},
        "pools": {MODEL: {"workers": [{"url": u} for u in urls], **pool}},
    }


async def test_reload_keeps_old_config_on_error_and_swaps_on_success(
    sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    workers = await sims(2, time_scale=1.0)
    path = tmp_path / "routing.yaml"
    path.write_text(yaml.safe_dump(_config_dict([workers[0].url])))
    runner, url = await start_gateway(gateway_config([workers[0].url]), str(path))
    state = runner.app[STATE]
    try:
        chat = url + "/v1/chat/completions"
        in_flight = asyncio.create_task(http.post(chat, json=chat_body("long", max_tokens=60)))

        path.write_text("pools: {broken: [")
        problems = await state.reload()
        assert problems
        async with http.post(chat, json=chat_body()) as resp:
            assert resp.status == 200  # the old config still serves

        path.write_text(yaml.safe_dump(_config_dict([workers[0].url], aliases=["renamed"])))
        assert await state.reload() == []
        async with http.post(chat, json=chat_body(model="renamed")) as resp:
            assert resp.status == 200
        old_worker = state.registry.pools[MODEL].workers[0]

        both = _config_dict([workers[0].url, workers[1].url], aliases=["renamed"])
        path.write_text(yaml.safe_dump(both))
        assert await state.reload() == []
        pool = state.registry.pools[MODEL]
        assert pool.workers[0] is old_worker  # a worker that stays keeps its state
        await wait_for(lambda: all(w.routable for w in pool.workers), what="new worker healthy")

        response = await in_flight  # the request that straddled three reloads finished normally
        assert response.status == 200
        assert (await response.json())["usage"]["completion_tokens"] == 60
    finally:
        await runner.cleanup()


async def test_sigterm_drains_in_flight_streams(
    sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    workers = await sims(1, time_scale=1.0)
    config = _config_dict([workers[0].url])
    config["drain_timeout_s"] = 30
    proc, url, _ = await _serve_process(config, tmp_path)
    try:
        await wait_for(lambda: _ready(http, url), timeout_s=30, what="gateway ready")
        body = chat_body("a long answer please", stream=True, max_tokens=80)
        stream = await http.post(url + "/v1/chat/completions", json=body)
        assert stream.status == 200
        first = await stream.content.readany()
        assert first.startswith(b"data: ")
        proc.send_signal(signal.SIGTERM)
        await wait_for(lambda: _refused(url), timeout_s=10, what="listener closed")
        _, done = await read_events(stream)
        assert done, "the in-flight stream finished with [DONE] during the drain"
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_sighup_reloads(
    sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    workers = await sims(1)
    config = _config_dict([workers[0].url])
    proc, url, path = await _serve_process(config, tmp_path)
    try:
        await wait_for(lambda: _ready(http, url), timeout_s=30, what="gateway ready")
        config["pools"][MODEL]["aliases"] = ["after-hup"]  # type: ignore[index]
        path.write_text(yaml.safe_dump(config))
        proc.send_signal(signal.SIGHUP)

        async def alias_served() -> bool:
            async with http.get(url + "/v1/models") as resp:
                return "after-hup" in json.dumps(await resp.json())

        await wait_for(alias_served, what="alias from the reloaded file")
    finally:
        proc.terminate()
        await proc.wait()


async def _serve_process(
    config: dict[str, object], tmp_path: Path
) -> tuple[asyncio.subprocess.Process, str, Path]:
    """`prefix-router serve --config` as a real process on a free port."""
    port = _free_port()
    config["listen"] = {"host": "127.0.0.1", "port": port}
    path = tmp_path / "routing.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "router",
        "serve",
        "--config",
        str(path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    return proc, f"http://127.0.0.1:{port}", path


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _ready(http: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with http.get(url + "/ready") as resp:
            return resp.status == 200
    except aiohttp.ClientError:
        return False


async def _refused(url: str) -> bool:
    try:
        async with aiohttp.ClientSession() as fresh, fresh.get(url + "/health") as resp:
            await resp.read()
            return False
    except aiohttp.ClientError:
        return True


async def test_reload_applies_timeouts_and_outlier_settings(
    sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    slow, failing = await sims(2, time_scale=1.0)
    path = tmp_path / "routing.yaml"
    conf = _config_dict([slow.url, failing.url], policy={"name": "round_robin"})
    path.write_text(yaml.safe_dump(conf))
    runner, url = await start_gateway(parse_config(conf), str(path))
    state = runner.app[STATE]
    chat = url + "/v1/chat/completions"
    root_level = logging.getLogger().level
    try:
        pool = state.registry.pools[MODEL]
        await wait_for(lambda: all(w.routable for w in pool.workers), what="workers healthy")
        conf["timeouts"] = {"total_s": 0.1}
        conf["outlier"] = {"consecutive_failures": 1}
        conf["log_level"] = "error"
        path.write_text(yaml.safe_dump(conf))
        assert await state.reload() == []
        assert logging.getLogger().level == logging.ERROR

        # A ~0.4 s answer now outlives the reloaded total deadline.
        async with http.post(chat, json=chat_body(max_tokens=60, ignore_eos=True)) as resp:
            assert resp.status == 504, await resp.text()

        # One failure is now enough to eject a worker.
        fault = {"faults": [{"kind": "status", "status": 503, "count": 10}]}
        async with http.post(failing.url + "/sim/faults", json=fault) as resp:
            assert resp.status == 200
        worker = next(w for w in pool.workers if w.url == failing.url)
        for _ in range(2):  # round robin: one of two requests goes to the failing worker
            async with http.post(chat, json=chat_body(max_tokens=1)) as resp:
                assert resp.status == 200
        assert worker.ejections == 1
    finally:
        logging.getLogger().setLevel(root_level)
        await runner.cleanup()


async def test_reload_refuses_a_change_that_needs_a_restart_and_names_it(
    sims: SimFactory, tmp_path: Path
) -> None:
    (worker,) = await sims(1)
    path = tmp_path / "routing.yaml"
    conf = _config_dict([worker.url])
    path.write_text(yaml.safe_dump(conf))
    runner, _ = await start_gateway(parse_config(conf), str(path))
    state = runner.app[STATE]
    try:
        changed = {**conf, "listen": {"host": "127.0.0.1", "port": 1}, "drain_timeout_s": 5}
        changed["pools"] = {MODEL: {"workers": [{"url": worker.url}], "aliases": ["new"]}}
        path.write_text(yaml.safe_dump(changed))
        problems = await state.reload()
        assert [field for field, _ in problems] == ["listen.port", "drain_timeout_s"]
        assert "new" not in state.registry.pools[MODEL].config.aliases  # nothing half applied
    finally:
        await runner.cleanup()
