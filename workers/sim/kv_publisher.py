"""KV events of the simulated worker, published on ZMQ exactly as vLLM's ``ZmqEventPublisher``.

The publisher listens to the prefix cache, gathers the events of one engine step and sends them
as one batch (topic, 8-byte seq from 0, msgpack payload in the configured map or array form),
with int hashes and ``data_parallel_rank`` 0 as vLLM sends by default. It keeps the last
``kv_events_buffer_steps`` batches and answers replay requests on a bound ROUTER socket in the
>= 0.26 shape (``reference/vllm-interface.md`` §1.2-1.5). vLLM publishes from a thread; here the
sockets are ``zmq.asyncio`` sockets on the simulator's one loop, opened and closed with the app
through ``cleanup_ctx``. A reset happens outside any step, so its ``AllBlocksCleared`` is sent at
once rather than waiting for a step that may never come on an idle worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import suppress

import zmq
import zmq.asyncio
from aiohttp import web

from router.vllm_wire.block_hash import to_event_int
from router.vllm_wire.kv_events import (
    MEDIUM_GPU,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventMessage,
    KVEvent,
    KVEventBatch,
    encode_batch,
    event_frames,
    is_bind_endpoint,
    parse_replay_request,
    replay_batch_frames,
    replay_end_frames,
)
from workers.sim.cache import BlocksRemoved, BlocksStored, PrefixCache
from workers.sim.config import SimConfig

log = logging.getLogger("prefix_worker.sim.kv_events")

PUB_HWM = 100_000  # vLLM's default KVEventsConfig.hwm


class SimKVEventPublisher:
    """A ``KVEventListener`` that publishes one batch per engine step and serves replays."""

    def __init__(self, config: SimConfig) -> None:
        if config.kv_events_endpoint is None:
            raise ValueError("kv_events_endpoint is required to publish KV events")
        self._config = config
        self._pending: list[KVEvent] = []
        self._next_seq = 0
        self._buffer: deque[EventMessage] = deque(maxlen=config.kv_events_buffer_steps)
        self._context: zmq.asyncio.Context | None = None
        self._pub: zmq.asyncio.Socket | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._replay_task: asyncio.Task[None] | None = None
        self.endpoint: str = config.kv_events_endpoint  # resolved once bound
        self.replay_endpoint: str | None = config.kv_events_replay_endpoint

    @property
    def next_seq(self) -> int:
        return self._next_seq

    # -- KVEventListener ---------------------------------------------------------------------

    def blocks_stored(self, event: BlocksStored) -> None:
        parent = event.parent_block_hash
        self._pending.append(
            BlockStored(
                block_hashes=tuple(to_event_int(h) for h in event.block_hashes),
                parent_block_hash=None if parent is None else to_event_int(parent),
                token_ids=event.token_ids,
                block_size=event.block_size,
                medium=MEDIUM_GPU,
                lora_name=event.lora_name,
                extra_keys=event.extra_keys,
                group_idx=0,
            )
        )

    def blocks_removed(self, event: BlocksRemoved) -> None:
        # vLLM evicts block by block and emits one event per hash.
        self._pending.extend(
            BlockRemoved((to_event_int(h),), MEDIUM_GPU, 0) for h in event.block_hashes
        )

    def all_blocks_cleared(self) -> None:
        self._pending.append(AllBlocksCleared())
        self.step_finished()

    def step_finished(self) -> None:
        if not self._pending:
            return  # vLLM sends no batch for a step without events
        batch = KVEventBatch(ts=time.time(), events=tuple(self._pending), dp_rank=0)
        self._pending = []
        message = EventMessage(
            self._next_seq,
            encode_batch(batch, self._config.kv_events_format),
            self._config.kv_events_topic,
        )
        self._next_seq += 1
        self._buffer.append(message)
        if self._pub is not None:
            # A PUB socket never blocks (it drops beyond the HWM), so the send completes now.
            sent = self._pub.send_multipart(
                event_frames(message.seq, message.payload, message.topic)
            )
            if isinstance(sent, asyncio.Future):
                sent.add_done_callback(_log_send_failure)

    # -- sockets ---------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self._config
        context = zmq.asyncio.Context()
        self._context = context
        pub = context.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.set_hwm(PUB_HWM)
        if is_bind_endpoint(self.endpoint):
            pub.bind(self.endpoint)
            self.endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            pub.connect(self.endpoint)
        self._pub = pub
        if cfg.kv_events_replay_endpoint is not None:
            router = context.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            router.setsockopt(zmq.SNDHWM, 2 * (cfg.kv_events_buffer_steps + 1))
            router.bind(cfg.kv_events_replay_endpoint)  # vLLM always binds the replay socket
            self.replay_endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
            self._router = router
            self._replay_task = asyncio.create_task(self._serve_replay(router), name="kv-replay")

    async def stop(self) -> None:
        if self._replay_task is not None:
            self._replay_task.cancel()
            with suppress(asyncio.CancelledError):
                await self._replay_task
            self._replay_task = None
        # Closed here, not in the task: a task cancelled before it first ran never runs its
        # finally, and term() would then wait forever for the socket.
        for sock in (self._router, self._pub):
            if sock is not None:
                sock.close(linger=0)
        self._router = self._pub = None
        if self._context is not None:
            self._context.destroy(linger=0)
            self._context = None

    async def _serve_replay(self, router: zmq.asyncio.Socket) -> None:
        while True:
            request = parse_replay_request(await router.recv_multipart())
            if request is None:
                log.warning("ignoring a malformed KV event replay request")
                continue
            identity, start_seq = request
            # Copy first: steps keep appending while the replies are sent.
            for message in [m for m in self._buffer if m.seq >= start_seq]:
                await router.send_multipart(replay_batch_frames(identity, message))
            await router.send_multipart(replay_end_frames(identity))

    def sources(self) -> dict[str, dict[str, object]]:
        """The body of vLLM 0.33's ``GET /kv_event_sources`` (one DP rank)."""
        cfg = self._config
        return {
            "0": {
                "enable_kv_cache_events": True,
                "publisher": "zmq",
                "endpoint": self.endpoint,
                "replay_endpoint": self.replay_endpoint,
                "buffer_steps": cfg.kv_events_buffer_steps,
                "hwm": PUB_HWM,
                "max_queue_size": 100_000,
                "topic": cfg.kv_events_topic,
            }
        }


def _log_send_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("publishing a KV event batch failed: %s", future.exception())


KV_PUBLISHER = web.AppKey("kv_publisher", SimKVEventPublisher)


async def kv_event_sources(request: web.Request) -> web.Response:
    return web.json_response(request.app[KV_PUBLISHER].sources())


async def _run_publisher(app: web.Application) -> AsyncIterator[None]:
    publisher = app[KV_PUBLISHER]
    await publisher.start()
    yield
    await publisher.stop()


def install_kv_events(app: web.Application, config: SimConfig, cache: PrefixCache) -> None:
    """Publish the cache's events if the config enables them (call from ``build_sim_app``)."""
    if config.kv_events_endpoint is None:
        return
    publisher = SimKVEventPublisher(config)
    cache.add_listener(publisher)
    app[KV_PUBLISHER] = publisher
    app.cleanup_ctx.append(_run_publisher)
    app.router.add_get("/kv_event_sources", kv_event_sources)
