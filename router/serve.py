"""Running the gateway process: uvloop, the listening socket, signals, graceful stop."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal

import uvloop
from aiohttp import web

from router.app import build_app
from router.config import GatewayConfig
from router.http.context import STATE
from router.http.front.site import FrontSite
from router.logs import FLUSH_EVERY_S, flush_logs

log = logging.getLogger("prefix_router")


async def start_gateway(
    config: GatewayConfig, config_path: str | None = None
) -> tuple[web.AppRunner, str]:
    """Start the gateway on the configured address; returns the runner and its base URL."""
    app = build_app(config, config_path=config_path)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=config.drain_timeout_s,
    )
    await runner.setup()
    site = FrontSite(
        runner, app[STATE], config.listen.host, config.listen.port, config.drain_timeout_s
    )
    await site.start()
    return runner, f"http://{config.listen.host}:{site.port}"


async def serve_until_stopped(config: GatewayConfig, config_path: str | None = None) -> None:
    if not config.auth.enabled:
        log.warning("auth is off (auth.enabled: false): anyone who can reach this port may use it")
    runner, url = await start_gateway(config, config_path)
    settle_gc()
    state = runner.app[STATE]
    state.on_reload.append(lambda _config: settle_gc())
    log.info("prefix-router listening on %s", url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[list[tuple[str, str]]]] = set()

    def reload() -> None:
        task = loop.create_task(state.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)

    async def flush_forever() -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY_S)
            flush_logs()

    flusher = loop.create_task(flush_forever())
    await stop.wait()
    # Drain: /ready fails from now on, the listener closes, and requests in flight (streams
    # included) get up to drain_timeout_s to finish before they are cancelled.
    state.draining = True
    log.info("stopping: draining in-flight requests for up to %gs", config.drain_timeout_s)
    await runner.cleanup()
    flusher.cancel()
    log.info("stopped")
    flush_logs()


GC_YOUNG_THRESHOLD = 20_000
"""Container allocations between two young-generation collections (CPython's default: 700)."""


def settle_gc() -> None:
    """Keep the cyclic garbage collector off the request path once the gateway is up.

    Nearly everything a request allocates is freed by reference counting; the collector's
    passes are pure cost, and at the default threshold one ran every few requests (about 0.1 ms
    of CPU per request at 1000 req/s, mostly older-generation passes over the modules, config
    and routing state built at startup). What exists now is moved out of the collector's view
    for good (`gc.freeze`), and young collections run 30x less often: the few cycles requests
    make (a task and its exception) wait a little longer to be freed."""
    gc.unfreeze()  # after a reload: what it replaced may be garbage now
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def run(config: GatewayConfig, config_path: str | None = None) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve_until_stopped(config, config_path))
