"""The worker agent: one vLLM worker's registration, load and KV events, mirrored into Redis.

``WorkerAgent`` runs beside a worker on one asyncio loop. It learns the served model from
``/v1/models`` (unless configured), then runs two loops: every ``interval_s`` it scrapes
``/metrics`` (``parse_vllm_metrics``, the gateway's own parser) and heartbeats the registration
and load, which stops when the worker stops answering so its registration lapses; and it follows
the KV events (``KVEventSubscriber``), applying each batch or resync to ``RedisFleetWriter``.
Neither a missing worker nor a missing Redis stops it: it waits, retries and catches up. On stop
(SIGTERM/SIGINT from the CLI) it deregisters the worker. ``run_agent`` is the CLI's entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from contextlib import suppress

import aiohttp

from router.domain.worker import ReportedLoad
from router.state.redis_client import RedisClient, connect
from router.upstream.load_scrape import parse_vllm_metrics
from workers.agent.config import AgentConfig
from workers.agent.publisher import RedisFleetWriter
from workers.agent.subscriber import Batch, KVEventSubscriber

log = logging.getLogger("prefix_worker.agent")

_MODEL_RETRY_MAX_S = 5.0


class WorkerAgent:
    """Start with ``start()``, stop with ``stop()`` (which deregisters the worker)."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.subscriber = KVEventSubscriber(
            config.kv_events_endpoint,
            config.replay_endpoint,
            config.topic,
            config.replay_timeout_s,
            config.replay_probe_s,
        )
        self.writer: RedisFleetWriter | None = None  # once the model is known
        self.last_load: ReportedLoad | None = None
        self._session: aiohttp.ClientSession | None = None
        self._redis: RedisClient | None = None
        self._main: asyncio.Task[None] | None = None

    async def start(self) -> None:
        cfg = self.config
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=cfg.http_timeout_s)
        )
        # No client-side retries: the writer has its own backoff and must learn of outages fast.
        self._redis = connect(
            cfg.redis_url,
            cluster=cfg.redis_cluster,
            timeout_s=cfg.redis_timeout_s,
            decode_responses=True,
        )
        # Subscribe before anything else so ZMQ queues batches while the model is looked up.
        self.subscriber.start()
        self._main = asyncio.create_task(self._run(), name="worker-agent")

    async def join(self) -> None:
        """Return when the agent's main task ends (only by failing, or after ``stop``)."""
        if self._main is not None:
            await asyncio.shield(self._main)

    async def stop(self) -> None:
        if self._main is not None:
            self._main.cancel()
            with suppress(asyncio.CancelledError):
                await self._main
            self._main = None
        if self.writer is not None:
            await self.writer.deregister()
            await self.writer.close()
        self.subscriber.close()
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    async def _run(self) -> None:
        assert self._redis is not None
        model = self.config.model or await self._discover_model()
        writer = RedisFleetWriter(self._redis, self.config, model)
        self.writer = writer
        load = await self._scrape()
        if load is not None:
            self.last_load = load
            await writer.heartbeat(load)  # carries block size and capacity into the registration
        else:
            await writer.register()
        heartbeats = asyncio.create_task(self._heartbeat_loop(writer), name="agent-heartbeat")
        try:
            async for item in self.subscriber.items():
                if isinstance(item, Batch):
                    await writer.apply(item.seq, item.batch)
                else:
                    await writer.resync()
        finally:
            heartbeats.cancel()
            with suppress(asyncio.CancelledError):
                await heartbeats

    async def _heartbeat_loop(self, writer: RedisFleetWriter) -> None:
        while True:
            await asyncio.sleep(self.config.interval_s)  # the cadence, not synchronization
            load = await self._scrape()
            if load is not None:  # a silent worker's registration is left to expire
                self.last_load = load
                await writer.heartbeat(load)

    async def _scrape(self) -> ReportedLoad | None:
        assert self._session is not None
        try:
            async with self._session.get(self.config.vllm_url.rstrip("/") + "/metrics") as resp:
                if resp.status != 200:
                    return None
                return parse_vllm_metrics(await resp.text())
        except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError) as exc:
            log.debug("scraping %s failed: %s", self.config.vllm_url, exc)
            return None

    async def _discover_model(self) -> str:
        """The first model the worker serves, waiting (with backoff) until it answers."""
        assert self._session is not None
        url = self.config.vllm_url.rstrip("/") + "/v1/models"
        delay_s, warned = 0.1, False
        while True:
            try:
                async with self._session.get(url) as resp:
                    if resp.status == 200:
                        data = await resp.json()
                        return str(data["data"][0]["id"])
                    problem = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError, ValueError, LookupError, TypeError) as exc:
                problem = str(exc) or type(exc).__name__
            if not warned:
                log.warning("waiting for the worker's model from %s: %s", url, problem)
                warned = True
            await asyncio.sleep(delay_s)  # backoff while the worker starts
            delay_s = min(delay_s * 2, _MODEL_RETRY_MAX_S)


async def serve_agent_forever(config: AgentConfig) -> None:
    agent = WorkerAgent(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await agent.start()
    print(f"worker agent {config.worker_id!r}: {config.vllm_url} -> Redis", flush=True)
    stopped = asyncio.create_task(stop.wait())
    failed = asyncio.create_task(agent.join())
    try:
        await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        failed.cancel()
        await agent.stop()
    error = failed.exception() if failed.done() and not failed.cancelled() else None
    if error is not None:
        raise error


def run_agent(config: AgentConfig) -> None:
    """Run an agent until SIGINT/SIGTERM, on uvloop when it is installed."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but keep the CLI usable
        asyncio.run(serve_agent_forever(config))
        return
    uvloop.run(serve_agent_forever(config))
