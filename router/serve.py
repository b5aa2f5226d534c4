"""Running the gateway process: uvloop, the listening socket, signals, graceful stop."""

from __future__ import annotations

import asyncio
import logging
import signal

import uvloop
from aiohttp import web

from router.app import build_app
from router.config import GatewayConfig
from router.http.context import STATE

log = logging.getLogger("prefix_router")


async def start_gateway(config: GatewayConfig) -> tuple[web.AppRunner, str]:
    """Start the gateway on the configured address; returns the runner and its base URL."""
    app = build_app(config)
    runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.listen.host, config.listen.port, backlog=1024)
    await site.start()
    port = config.listen.port
    for address in runner.addresses:
        port = address[1]
        break
    return runner, f"http://{config.listen.host}:{port}"


async def serve_until_stopped(config: GatewayConfig) -> None:
    if not config.auth.enabled:
        log.warning("auth is off (auth.enabled: false): anyone who can reach this port may use it")
    runner, url = await start_gateway(config)
    log.info("prefix-router listening on %s", url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    app = runner.app
    app[STATE].draining = True
    log.info("stopping: draining in-flight requests")
    await runner.cleanup()


def run(config: GatewayConfig) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve_until_stopped(config))
