"""The worker agent against a real redis-server and real KV event publishers.

Publishers are either a simulated worker (``kv_events_*`` config) or, where a test must control
the frames exactly (seq jumps, the reference byte dump), a test XPUB + ROUTER pair that speaks
the same protocol; XPUB tells the test when the agent's subscription has arrived, so nothing
depends on timing. Every wait is a condition with a generous deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import zmq
import zmq.asyncio
from redis.asyncio import Redis

from router.state.keys import Keys
from router.vllm_wire.block_hash import to_event_int
from router.vllm_wire.kv_events import (
    BlockStored,
    EventMessage,
    KVEventBatch,
    decode_batch,
    encode_batch,
    encode_seq,
    parse_replay_request,
    replay_batch_frames,
    replay_end_frames,
)
from tests.redis_server import RedisServer
from tests.unit.test_kv_events import CLEARED_PAYLOAD, HASH_1, LEGACY_PAYLOAD, MAP_PAYLOAD
from workers.agent.agent import WorkerAgent
from workers.agent.config import AgentConfig
from workers.sim.app import SIM_STATE
from workers.sim.config import SimConfig
from workers.sim.kv_publisher import KV_PUBLISHER
from workers.sim.runner import SimHandle, start_sim_worker

MODEL = "agent-model"
WORKER = "w1"
PREFIX = "test:"
KEYS = Keys(PREFIX)
TCP_ANY = "tcp://127.0.0.1:*"  # '*' binds (vLLM's rule) on a free port; the sim reports it
SHARED = " ".join(f"shared{i}" for i in range(40))


async def wait_for(
    check: Callable[[], bool | Awaitable[bool]], what: str, deadline_s: float = 20.0
) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while True:
        result = check()
        if result if isinstance(result, bool) else await result:
            return
        if loop.time() > end:
            raise AssertionError(f"not within {deadline_s}s: {what}")
        await asyncio.sleep(0.02)


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


class Stack:
    """Sims and agents started by a test, stopped at its end (agents first)."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.sims: list[SimHandle] = []
        self.agents: list[WorkerAgent] = []

    async def sim(self, **overrides: Any) -> SimHandle:
        fields: dict[str, Any] = {"model": MODEL, "port": 0, "time_scale": 0.0, **overrides}
        handle = await start_sim_worker(SimConfig(**fields))
        self.sims.append(handle)
        return handle

    async def agent(
        self, vllm_url: str, endpoint: str, replay: str | None, **kw: Any
    ) -> WorkerAgent:
        fields: dict[str, Any] = {
            "vllm_url": vllm_url,
            "kv_events_endpoint": endpoint,
            "replay_endpoint": replay,
            "redis_url": self.redis_url,
            "worker_id": WORKER,
            "key_prefix": PREFIX,
            "interval_s": 0.1,
            "heartbeat_ttl_s": 5,
            "replay_timeout_s": 0.5,
            "replay_probe_s": 0.2,
            **kw,
        }
        agent = WorkerAgent(AgentConfig(**fields))
        await agent.start()
        self.agents.append(agent)
        return agent

    async def agent_for(self, sim: SimHandle, **kw: Any) -> WorkerAgent:
        publisher = sim.app[KV_PUBLISHER]
        return await self.agent(sim.url, publisher.endpoint, publisher.replay_endpoint, **kw)


@pytest.fixture
async def stack(redis_url: str) -> AsyncIterator[Stack]:
    started = Stack(redis_url)
    try:
        yield started
    finally:
        for agent in started.agents:
            await agent.stop()
        for sim in started.sims:
            await sim.stop()


def kv_sim(**overrides: Any) -> dict[str, Any]:
    return {"kv_events_endpoint": TCP_ANY, "kv_events_replay_endpoint": TCP_ANY, **overrides}


# -- helpers ---------------------------------------------------------------------------------


async def complete(http: aiohttp.ClientSession, sim: SimHandle, prompt: str) -> None:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 20}
    async with http.post(sim.url + "/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()


async def run_requests(http: aiohttp.ClientSession, sim: SimHandle, n: int, tag: str) -> None:
    for i in range(n):
        words = " ".join(f"{tag}{i}w{j}" for j in range(50))
        await complete(http, sim, f"{SHARED} {words}")


def sim_hashes(sim: SimHandle) -> set[int] | None:
    """The sim's cached blocks as event ints, or None while a request still pins blocks."""
    state = sim.app[SIM_STATE]
    if state.engine.num_running or state.engine.num_waiting:
        return None
    cached = state.cache.eviction_order()  # every cached block is unpinned when idle
    assert len(cached) == state.cache.cached_blocks
    return {to_event_int(h) for h in cached}


async def snapshot(redis: Redis, worker: str = WORKER) -> set[int]:
    return {int(h) for h in await redis.smembers(KEYS.kv_snapshot(MODEL, worker))}


async def stream(redis: Redis) -> list[dict[str, str]]:
    entries: Any = await redis.xrange(KEYS.kv_stream_of(MODEL, WORKER))
    return [fields for _, fields in entries]


def replay_stream(entries: list[dict[str, str]], worker: str = WORKER) -> set[int]:
    """What a gateway following the stream holds for ``worker``."""
    view: set[int] = set()
    for entry in entries:
        if entry["worker"] != worker:
            continue
        hashes = {int(h) for h in entry["hashes"].split()}
        if entry["op"] == "stored":
            view |= hashes
        elif entry["op"] == "removed":
            view -= hashes
        else:
            assert entry["op"] == "cleared" and not hashes
            view.clear()
    return view


async def wait_mirrored(redis: Redis, sim: SimHandle) -> set[int]:
    async def mirrored() -> bool:
        expected = sim_hashes(sim)
        return expected is not None and await snapshot(redis) == expected

    await wait_for(mirrored, "the Redis snapshot equals the sim's cache")
    return await snapshot(redis)


class ScriptedPublisher:
    """A worker's KV event sockets under the test's control: XPUB (live) and ROUTER (replay)."""

    def __init__(self, legacy_replay: bool = False) -> None:
        self._context = zmq.asyncio.Context()
        self._xpub = self._context.socket(zmq.XPUB)
        self._xpub.setsockopt(zmq.LINGER, 0)
        self._xpub.bind("tcp://127.0.0.1:*")
        self.endpoint = self._xpub.getsockopt_string(zmq.LAST_ENDPOINT)
        self._router = self._context.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.bind("tcp://127.0.0.1:*")
        self.replay_endpoint = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.buffer: dict[int, EventMessage] = {}
        self.replay_requests: list[int] = []
        self._legacy = legacy_replay
        self._task = asyncio.create_task(self._serve())

    async def wait_subscribed(self) -> bytes:
        frame: bytes = await asyncio.wait_for(self._xpub.recv(), 20.0)
        assert frame[:1] == b"\x01"
        return frame[1:]

    async def publish(
        self, seq: int, payload: bytes, topic: str = "", live: bool = True, keep: bool = True
    ) -> None:
        message = EventMessage(seq, payload, topic)
        if keep:
            self.buffer[seq] = message
        if live:
            await self._xpub.send_multipart([topic.encode(), encode_seq(seq), payload])

    async def _serve(self) -> None:
        while True:
            request = parse_replay_request(await self._router.recv_multipart())
            assert request is not None
            identity, start = request
            self.replay_requests.append(start)
            for seq in sorted(s for s in self.buffer if s >= start):
                frames = replay_batch_frames(identity, self.buffer[seq], legacy=self._legacy)
                await self._router.send_multipart(frames)
            await self._router.send_multipart(replay_end_frames(identity, legacy=self._legacy))

    async def close(self) -> None:
        self._task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self._task
        self._xpub.close(linger=0)
        self._router.close(linger=0)
        self._context.destroy(linger=0)


@pytest.fixture
async def publisher_factory() -> AsyncIterator[Callable[..., ScriptedPublisher]]:
    made: list[ScriptedPublisher] = []

    def make(**kw: Any) -> ScriptedPublisher:
        made.append(ScriptedPublisher(**kw))
        return made[-1]

    yield make
    for publisher in made:
        await publisher.close()


def stored(*hashes: int, parent: int | None = None) -> bytes:
    event = BlockStored(hashes, parent, tuple(range(16 * len(hashes))), 16, medium="GPU")
    return encode_batch(KVEventBatch(1.0, (event,), 0))


# -- tests -----------------------------------------------------------------------------------


async def test_agent_mirrors_a_worker(
    stack: Stack, redis: Redis, http: aiohttp.ClientSession
) -> None:
    sim = await stack.sim(num_gpu_blocks=24, **kv_sim())  # small: later requests evict
    agent = await stack.agent_for(sim)  # no --model: it asks /v1/models
    await wait_for(lambda: agent.subscriber.following.is_set(), "agent follows")
    await run_requests(http, sim, 8, "a")
    view = await wait_mirrored(redis, sim)
    assert view

    registration = await redis.hgetall(KEYS.worker(WORKER))
    assert registration["url"] == sim.url and registration["model"] == MODEL
    assert registration["block_size"] == "16" and registration["num_gpu_blocks"] == "24"
    assert float(registration["agent_started_at"]) > 0
    assert 0 < await redis.ttl(KEYS.worker(WORKER)) <= 5
    assert await redis.sismember(KEYS.workers(MODEL), WORKER)

    async def load_reported() -> bool:
        load = await redis.hgetall(KEYS.load(WORKER))
        return bool(load) and float(load["prefix_queries"]) > 0

    await wait_for(load_reported, "load with the prefix counters")
    load = await redis.hgetall(KEYS.load(WORKER))
    assert set(load) == {
        "running",
        "waiting",
        "kv_usage",
        "prefix_hits",
        "prefix_queries",
        "lora_running",
        "lora_waiting",
        "max_lora",
        "ts",
    }
    assert load["max_lora"] == ""  # the worker serves no adapters
    assert float(load["prefix_hits"]) > 0  # the shared prefix hit
    assert 0 < await redis.ttl(KEYS.kv_snapshot(MODEL, WORKER)) <= 50

    entries = await stream(redis)
    assert {e["op"] for e in entries} == {"cleared", "stored", "removed"}
    assert all(e["worker"] == WORKER for e in entries)
    assert any(e["parent"] for e in entries if e["op"] == "stored")
    assert replay_stream(entries) == view


@pytest.mark.parametrize("fmt", ["map", "array"])
async def test_a_late_agent_rebuilds_through_replay(
    stack: Stack, redis: Redis, http: aiohttp.ClientSession, fmt: str
) -> None:
    sim = await stack.sim(**kv_sim(kv_events_format=fmt))
    await run_requests(http, sim, 4, "late")  # before any agent listens
    agent = await stack.agent_for(sim, model=MODEL)
    view = await wait_mirrored(redis, sim)
    assert view and agent.subscriber.stats.replayed > 0
    assert replay_stream(await stream(redis)) == view


async def test_a_seq_gap_is_filled_by_replay(
    stack: Stack, redis: Redis, publisher_factory: Callable[..., ScriptedPublisher]
) -> None:
    sim = await stack.sim()  # serves /metrics and /v1/models; events come from the test
    pub = publisher_factory(legacy_replay=True)  # the <= 0.25 reply shape
    agent = await stack.agent(sim.url, pub.endpoint, pub.replay_endpoint, replay_probe_s=60)
    await pub.wait_subscribed()
    await wait_for(lambda: agent.subscriber.following.is_set(), "agent follows")
    await pub.publish(0, stored(10))
    await pub.publish(1, stored(11, parent=10), live=False)  # the SUB never sees seq 1
    await pub.publish(2, stored(12, parent=11))

    async def all_three() -> bool:
        return await snapshot(redis) == {10, 11, 12}

    await wait_for(all_three, "seq 1 recovered")
    stats = agent.subscriber.stats
    assert stats.gaps == 1 and stats.resyncs == 1  # the start-up resync only
    assert 1 in pub.replay_requests


async def test_a_gap_beyond_the_replay_buffer_resyncs(
    stack: Stack, redis: Redis, publisher_factory: Callable[..., ScriptedPublisher]
) -> None:
    sim = await stack.sim()
    pub = publisher_factory()
    agent = await stack.agent(sim.url, pub.endpoint, pub.replay_endpoint, replay_probe_s=60)
    await pub.wait_subscribed()
    await wait_for(lambda: agent.subscriber.following.is_set(), "agent follows")
    await pub.publish(0, stored(20))

    async def first() -> bool:
        return await snapshot(redis) == {20}

    await wait_for(first, "seq 0 applied")
    await pub.publish(1, stored(21), live=False, keep=False)  # gone everywhere
    await pub.publish(2, stored(22))

    async def resynced() -> bool:
        return await snapshot(redis) == {22}

    await wait_for(resynced, "resync keeps only what the buffer still has")
    assert agent.subscriber.stats.resyncs == 2
    entries = await stream(redis)
    assert [e["op"] for e in entries] == ["cleared", "stored", "cleared", "stored"]
    assert replay_stream(entries) == {22}


async def test_a_worker_restart_is_treated_as_cleared(
    stack: Stack, redis: Redis, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # ipc endpoints (bound, as '*' would be) let the restarted worker take the same address.
    kv = {
        "kv_events_endpoint": f"ipc://{tmp_path}/kv.sock",
        "kv_events_replay_endpoint": f"ipc://{tmp_path}/replay.sock",
    }
    first = await stack.sim(**kv)
    agent = await stack.agent_for(first, model=MODEL)
    await run_requests(http, first, 8, "before")
    before = await wait_mirrored(redis, first)
    await first.stop()
    stack.sims.remove(first)

    second = await stack.sim(port=first.port, **kv)  # seq starts again at 0
    await run_requests(http, second, 2, "after")
    after = await wait_mirrored(redis, second)
    assert after and before - after  # the first worker's own blocks are gone from Redis
    assert agent.subscriber.stats.restarts >= 1
    assert replay_stream(await stream(redis)) == after


async def test_all_blocks_cleared_empties_the_snapshot(
    stack: Stack, redis: Redis, http: aiohttp.ClientSession
) -> None:
    sim = await stack.sim(**kv_sim())
    await stack.agent_for(sim, model=MODEL)
    await run_requests(http, sim, 3, "c")
    assert await wait_mirrored(redis, sim)
    async with http.post(sim.url + "/sim/reset") as resp:
        assert resp.status == 200

    async def emptied() -> bool:
        return not await redis.exists(KEYS.kv_snapshot(MODEL, WORKER))

    await wait_for(emptied, "the snapshot is gone")
    last = (await stream(redis))[-1]
    assert last["op"] == "cleared" and last["seq"] != ""  # from the worker's AllBlocksCleared
    await run_requests(http, sim, 1, "again")  # and it follows on
    assert await wait_mirrored(redis, sim)


async def test_the_reference_byte_dump_is_decoded_and_published(
    stack: Stack, redis: Redis, publisher_factory: Callable[..., ScriptedPublisher]
) -> None:
    sim = await stack.sim()
    pub = publisher_factory()
    agent = await stack.agent(
        sim.url, pub.endpoint, pub.replay_endpoint, topic="kv-events", model=MODEL
    )
    assert await pub.wait_subscribed() == b"kv-events"
    await wait_for(lambda: agent.subscriber.following.is_set(), "agent follows")
    await pub.publish(0, MAP_PAYLOAD, topic="kv-events")  # reference §1.4 frames

    async def stored_hash() -> bool:
        return await snapshot(redis) == {HASH_1}

    await wait_for(stored_hash, "the dump's block is in the snapshot")
    entry = (await stream(redis))[-1]
    assert entry == {
        "worker": WORKER,
        "op": "stored",
        "hashes": str(HASH_1),
        "parent": "",
        "seq": "0",
    }
    await pub.publish(1, LEGACY_PAYLOAD, topic="kv-events")  # the same event, <= 0.23 form
    await pub.publish(2, CLEARED_PAYLOAD, topic="kv-events")

    async def cleared() -> bool:
        entries = await stream(redis)
        return entries[-1]["op"] == "cleared" and entries[-1]["seq"] == "2"

    await wait_for(cleared, "the 35-byte AllBlocksCleared batch is applied")
    assert not await redis.exists(KEYS.kv_snapshot(MODEL, WORKER))
    assert [e["seq"] for e in await stream(redis)] == ["", "0", "1", "2"]


async def test_stopping_the_agent_deregisters(
    stack: Stack, redis: Redis, http: aiohttp.ClientSession
) -> None:
    sim = await stack.sim(**kv_sim())
    agent = await stack.agent_for(sim)
    await run_requests(http, sim, 2, "s")
    await wait_mirrored(redis, sim)

    async def loaded() -> bool:
        return bool(await redis.exists(KEYS.load(WORKER)))

    await wait_for(loaded, "load published")
    await agent.stop()
    stack.agents.remove(agent)
    assert not await redis.sismember(KEYS.workers(MODEL), WORKER)
    for key in (KEYS.worker(WORKER), KEYS.load(WORKER), KEYS.kv_snapshot(MODEL, WORKER)):
        assert not await redis.exists(key)
    assert (await stream(redis))[-1]["op"] == "cleared"


async def test_a_redis_outage_is_survived_and_resynced(
    stack: Stack,
    redis_server: RedisServer,
    redis: Redis,
    http: aiohttp.ClientSession,
) -> None:
    sim = await stack.sim(**kv_sim())
    agent = await stack.agent_for(sim, model=MODEL)
    await run_requests(http, sim, 2, "up")
    await wait_mirrored(redis, sim)

    await redis_server.astop()
    await run_requests(http, sim, 3, "down")  # events arrive while Redis is gone
    await wait_for(lambda: agent.writer is not None and not agent.writer.redis_up, "down")
    await redis_server.astart()  # empty: nothing was persisted
    await redis.connection_pool.disconnect()  # the test's own client: drop dead connections

    view = await wait_mirrored(redis, sim)
    assert await redis.hget(KEYS.worker(WORKER), "url") == sim.url
    assert await redis.sismember(KEYS.workers(MODEL), WORKER)
    assert replay_stream(await stream(redis)) == view
    assert agent.writer is not None and agent.writer.outages == 1


async def test_the_sim_publishes_vllm_frames_and_sources(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    sim = await stack.sim(**kv_sim(kv_events_topic="kv-events"))
    async with http.get(sim.url + "/kv_event_sources") as resp:
        sources = await resp.json()
    publisher = sim.app[KV_PUBLISHER]
    assert sources["0"]["endpoint"] == publisher.endpoint != TCP_ANY
    assert sources["0"]["replay_endpoint"] == publisher.replay_endpoint
    assert sources["0"]["topic"] == "kv-events" and sources["0"]["publisher"] == "zmq"
    await run_requests(http, sim, 2, "f")
    assert publisher.next_seq > 0

    context = zmq.asyncio.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.connect(publisher.replay_endpoint or "")
    try:
        await dealer.send_multipart([b"", encode_seq(0)])
        seqs: list[int] = []
        stored_hashes: set[int] = set()
        while True:
            frames = await asyncio.wait_for(dealer.recv_multipart(), 10.0)
            if frames[2] == b"\xff" * 8:  # >= 0.26 end marker: b"", b"", END_SEQ, b""
                assert frames == [b"", b"", b"\xff" * 8, b""]
                break
            assert len(frames) == 4 and frames[0] == b"" and frames[1] == b"kv-events"
            seqs.append(int.from_bytes(frames[2], "big"))
            batch = decode_batch(frames[3])
            assert batch.dp_rank == 0 and batch.events
            for event in batch.events:
                if isinstance(event, BlockStored):
                    assert event.medium == "GPU" and event.block_size == 16
                    assert len(event.token_ids) == 16 * len(event.block_hashes)
                    stored_hashes.update(event.block_hashes)
    finally:
        dealer.close(linger=0)
        context.destroy(linger=0)
    assert seqs == list(range(publisher.next_seq))
    assert sim_hashes(sim) == stored_hashes  # nothing was evicted: 2048 blocks
