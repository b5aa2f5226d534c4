"""Starting and stopping the processes a benchmark measures: simulated workers and gateways.

Each runs as its own OS process, as in production, so its CPU time can be read from /proc and
the load generator does not share its event loop.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import aiohttp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


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


@dataclass
class Fleet:
    procs: list[Proc] = field(default_factory=list)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def _spawn(args: list[str], url: str, name: str) -> Proc:
    log_path = f"/tmp/prefix-router-bench-{name}-{os.getpid()}.log"
    log = open(log_path, "wb")  # noqa: SIM115 - the child process owns it until it exits
    popen = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    return Proc(url=url, popen=popen, log_path=log_path)


def start_sim(model: str, extra: list[str] | None = None, port: int | None = None) -> Proc:
    port = port or free_port()
    args = [sys.executable, "-m", "workers", "sim", "--port", str(port), "--model", model]
    return _spawn(args + (extra or []), f"http://127.0.0.1:{port}", f"sim{port}")


def start_gateway_process(config_path: str) -> Proc:
    port = free_port()
    args = [sys.executable, "-m", "router", "serve", "--config", config_path, "--port", str(port)]
    return _spawn(args, f"http://127.0.0.1:{port}", f"gw{port}")


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
