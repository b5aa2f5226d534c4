"""Starting and serving a simulated worker: in-process for tests and benchmarks, or forever.

``start_sim_worker`` binds the app on the configured host and port (0 picks a free port) and
returns a handle with the base URL, which is what a gateway's worker list takes (no ``/v1``).
The runner enables ``handler_cancellation`` so that a client hanging up cancels its handler and
aborts the request in the engine, as vLLM does; aiohttp already sets TCP_NODELAY on every
accepted connection, so streamed chunks are not held back by Nagle's algorithm. ``run_sim`` is
the CLI's entry: the same app on uvloop until interrupted, or several (``--workers N``): one
process and one event loop for a whole simulated fleet, each worker with its own port, cache,
timing and KV-event publisher, so 64 of them fit on a small machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
from dataclasses import dataclass

from aiohttp import web

from workers.sim.app import build_sim_app
from workers.sim.config import SimConfig


@dataclass(slots=True)
class SimHandle:
    """A running simulated worker."""

    url: str  # base URL, e.g. http://127.0.0.1:41234
    app: web.Application
    runner: web.AppRunner
    config: SimConfig

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    async def stop(self) -> None:
        await self.runner.cleanup()


def _bound_port(runner: web.AppRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    raise RuntimeError("simulated worker is not bound to a TCP port")


async def start_sim_worker(config: SimConfig) -> SimHandle:
    """Start a simulated worker on the running loop and return once it accepts connections."""
    app = build_sim_app(config)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    context = None
    if config.ssl_certfile is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(config.ssl_certfile, config.ssl_keyfile)
    try:
        site = web.TCPSite(runner, config.host, config.port, backlog=1024, ssl_context=context)
        await site.start()
        port = _bound_port(runner)
    except BaseException:
        await runner.cleanup()
        raise
    host = f"[{config.host}]" if ":" in config.host else config.host
    scheme = "https" if context is not None else "http"
    return SimHandle(url=f"{scheme}://{host}:{port}", app=app, runner=runner, config=config)


def _nth_endpoint(endpoint: str | None, index: int) -> str | None:
    """The `index`-th worker's ZMQ endpoint: TCP ports count up from the first (as vLLM's DP
    ranks do), other transports get a suffix."""
    if endpoint is None or index == 0:
        return endpoint
    head, sep, port = endpoint.rpartition(":")
    if endpoint.startswith("tcp://") and sep and port.isdigit():
        return f"{head}:{int(port) + index}"
    return f"{endpoint}-{index}"


def fleet_configs(config: SimConfig, workers: int) -> list[SimConfig]:
    """`workers` simulated workers from one config: ports from `config.port` on (each its own
    ephemeral port when it is 0), and KV-event endpoints likewise. Ports of different workers'
    KV events must not overlap: give the replay endpoint a base above the PUB ones' range."""
    out = []
    for i in range(workers):
        out.append(
            config.model_copy(
                update={
                    "port": config.port + i if config.port else 0,
                    "kv_events_endpoint": _nth_endpoint(config.kv_events_endpoint, i),
                    "kv_events_replay_endpoint": _nth_endpoint(config.kv_events_replay_endpoint, i),
                }
            )
        )
    return out


async def serve_sim_forever(configs: list[SimConfig]) -> None:
    """Serve every config's worker on this one event loop until SIGINT or SIGTERM."""
    handles: list[SimHandle] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        for config in configs:
            handle = await start_sim_worker(config)
            handles.append(handle)
            print(f"simulated vLLM worker for {config.model!r} serving on {handle.url}", flush=True)
        await stop.wait()
    finally:
        for handle in handles:
            await handle.stop()


def run_sim(config: SimConfig, workers: int = 1) -> None:
    """Serve `workers` simulated workers in this process until SIGINT/SIGTERM, on uvloop."""
    configs = fleet_configs(config, workers)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but keep the CLI usable
        asyncio.run(serve_sim_forever(configs))
        return
    uvloop.run(serve_sim_forever(configs))
