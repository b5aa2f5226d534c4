"""Writes one worker's registration, load and KV block set to Redis, surviving Redis outages.

The agent's own copy of the worker's block set (``view``) is the truth; Redis mirrors it with the
keys of ``router.state.keys``: each batch becomes one MULTI/EXEC that updates the worker's snapshot
set and appends the matching entries to its shard of the pool's KV streams (both keys share a hash
tag, so this holds on Redis Cluster too), so the snapshot and the stream never disagree.
Registration and load go in a plain pipeline: their keys live in other slots, and each carries its
own TTL. Redis errors never escape: the first one marks Redis down (logged once per outage), writes
are skipped while it is down, and a recovery task retries with backoff; when Redis answers it
re-registers the worker and rewrites the whole snapshot (a ``cleared`` entry, then ``stored``
chunks). Every write is a sequence of set assignments, so writing a batch the rewritten snapshot
already contains changes nothing; that is what makes the hand-over race-free.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from redis.typing import EncodableT, FieldT

from router.domain.worker import ReportedLoad
from router.state.keys import KV_SNAPSHOT_TTL_FACTOR, SNAPSHOT_CHUNK, Keys
from router.state.redis_client import REDIS_FAILURES, RedisClient
from router.state.redis_client import AnyPipeline as Pipeline
from router.vllm_wire.kv_events import (
    MEDIUM_GPU,
    AllBlocksCleared,
    BlockStored,
    KVEventBatch,
)
from workers.agent.config import AgentConfig

log = logging.getLogger("prefix_worker.agent.redis")

_RETRY_FIRST_S = 0.1


@dataclass(slots=True)
class _Op:
    op: str  # stored | removed | cleared
    hashes: list[int]
    parent: int | None = None


def _joined(hashes: Iterable[int]) -> str:
    return " ".join(map(str, hashes))


class RedisFleetWriter:
    """Mirrors one worker into Redis; every public coroutine returns without raising on Redis."""

    def __init__(self, redis: RedisClient, config: AgentConfig, model: str) -> None:
        self._redis = redis
        self._config = config
        self._keys = Keys(config.key_prefix)
        self.model = model
        self.view: set[int] = set()
        self._registration: dict[FieldT, EncodableT] = {
            "url": config.public_url,
            "model": model,
            "agent_started_at": f"{time.time():.3f}",
        }
        self._load: ReportedLoad | None = None
        self._lock = asyncio.Lock()  # keeps Redis writes in the order the view changed
        self._up = True
        self._recovery: asyncio.Task[None] | None = None
        self.outages = 0

    @property
    def redis_up(self) -> bool:
        return self._up

    # -- what the agent calls ------------------------------------------------------------------

    async def register(self) -> None:
        """Write the registration before the worker's load is known (the start's resync clears)."""
        await self._write(self._fill_heartbeat, atomic=False)

    async def heartbeat(self, load: ReportedLoad) -> None:
        """Refresh the registration's TTL and publish the worker's latest load."""
        self._load = load
        if load.block_size is not None:
            self._registration["block_size"] = str(load.block_size)
        if load.num_gpu_blocks is not None:
            self._registration["num_gpu_blocks"] = str(load.num_gpu_blocks)
        await self._write(self._fill_heartbeat, atomic=False)

    async def apply(self, seq: int, batch: KVEventBatch) -> None:
        ops = self._update_view(batch)
        if ops:
            await self._write(lambda pipe: self._fill_ops(pipe, ops, str(seq)))

    async def resync(self) -> None:
        """Forget the worker's blocks; what follows rebuilds them."""
        self.view.clear()
        await self._write(lambda pipe: self._fill_ops(pipe, [_Op("cleared", [])], ""))

    async def deregister(self) -> None:
        """Remove the worker and its records (best effort: skipped while Redis is down)."""
        keys, worker_id = self._keys, self._config.worker_id

        def fill(pipe: Pipeline) -> None:
            pipe.srem(keys.workers(self.model), worker_id)
            pipe.delete(keys.worker(worker_id))  # one key per DEL: they live in other slots
            pipe.delete(keys.load(worker_id))
            self._fill_ops(pipe, [_Op("cleared", [])], "")
            pipe.delete(keys.kv_snapshot(self.model, worker_id))

        await self._write(fill, atomic=False)

    async def close(self) -> None:
        if self._recovery is not None:
            self._recovery.cancel()
            with suppress(asyncio.CancelledError):
                await self._recovery
            self._recovery = None

    # -- the view ------------------------------------------------------------------------------

    def _update_view(self, batch: KVEventBatch) -> list[_Op]:
        view = self.view
        ops: list[_Op] = []
        for event in batch.events:
            if isinstance(event, AllBlocksCleared):
                view.clear()
                ops.append(_Op("cleared", []))
            elif event.medium not in (None, MEDIUM_GPU) or not event.block_hashes:
                continue  # offload tiers are not what a GPU prefix hit can use
            elif isinstance(event, BlockStored):
                view.update(event.block_hashes)
                ops.append(_Op("stored", list(event.block_hashes), event.parent_block_hash))
            else:
                view.difference_update(event.block_hashes)
                if ops and ops[-1].op == "removed":
                    ops[-1].hashes.extend(event.block_hashes)  # vLLM sends one hash per event
                else:
                    ops.append(_Op("removed", list(event.block_hashes)))
        return ops

    # -- pipeline contents -------------------------------------------------------------------

    def _entry(self, op: str, hashes: Sequence[int], parent: int | None, seq: str) -> Any:
        return {
            "worker": self._config.worker_id,
            "op": op,
            "hashes": _joined(hashes),
            "parent": "" if parent is None else str(parent),
            "seq": seq,
        }

    def _xadd(self, pipe: Pipeline, entry: Any) -> None:
        pipe.xadd(
            self._keys.kv_stream_of(self.model, self._config.worker_id),
            entry,
            maxlen=self._config.kv_stream_maxlen,
            approximate=True,
        )

    def _fill_ops(self, pipe: Pipeline, ops: list[_Op], seq: str) -> None:
        snap = self._keys.kv_snapshot(self.model, self._config.worker_id)
        for op in ops:
            if op.op == "stored":
                pipe.sadd(snap, *op.hashes)
            elif op.op == "removed":
                pipe.srem(snap, *op.hashes)
            else:
                pipe.delete(snap)
            self._xadd(pipe, self._entry(op.op, op.hashes, op.parent, seq))
        pipe.expire(snap, self._config.heartbeat_ttl_s * KV_SNAPSHOT_TTL_FACTOR)

    def _fill_heartbeat(self, pipe: Pipeline) -> None:
        keys, cfg = self._keys, self._config
        worker = keys.worker(cfg.worker_id)
        pipe.hset(worker, mapping=self._registration)
        pipe.expire(worker, cfg.heartbeat_ttl_s)
        pipe.sadd(keys.workers(self.model), cfg.worker_id)
        snapshot_ttl_s = cfg.heartbeat_ttl_s * KV_SNAPSHOT_TTL_FACTOR
        pipe.expire(keys.kv_snapshot(self.model, cfg.worker_id), snapshot_ttl_s)
        load = self._load
        if load is not None:
            load_key = keys.load(cfg.worker_id)
            pipe.hset(
                load_key,
                mapping={
                    "running": str(load.running),
                    "waiting": str(load.waiting),
                    "kv_usage": repr(load.kv_usage),
                    "prefix_hits": repr(load.prefix_hits),
                    "prefix_queries": repr(load.prefix_queries),
                    "lora_running": ",".join(sorted(load.lora_running)),
                    "lora_waiting": ",".join(sorted(load.lora_waiting)),
                    "max_lora": str(load.max_lora or ""),
                    "ts": f"{time.time():.3f}",
                },
            )
            pipe.expire(load_key, cfg.heartbeat_ttl_s)

    def _fill_snapshot(self, pipe: Pipeline, snapshot: list[int]) -> None:
        """The whole snapshot, also as stream entries for followers."""
        snap = self._keys.kv_snapshot(self.model, self._config.worker_id)
        pipe.delete(snap)
        self._xadd(pipe, self._entry("cleared", (), None, ""))
        for start in range(0, len(snapshot), SNAPSHOT_CHUNK):
            chunk = snapshot[start : start + SNAPSHOT_CHUNK]
            pipe.sadd(snap, *chunk)
            self._xadd(pipe, self._entry("stored", chunk, None, ""))
        pipe.expire(snap, self._config.heartbeat_ttl_s * KV_SNAPSHOT_TTL_FACTOR)

    # -- outage handling ---------------------------------------------------------------------

    async def _write(self, fill: Callable[[Pipeline], None], *, atomic: bool = True) -> None:
        """One pipeline of writes; `atomic` makes it a MULTI/EXEC (keys of one hash slot)."""
        # Checked after the caller changed the view: if Redis is down here, the recovery's
        # snapshot (taken later) includes the change.
        if not self._up:
            return
        async with self._lock:
            if not self._up:
                return
            try:
                pipe = self._redis.pipeline(transaction=atomic)
                fill(pipe)
                await pipe.execute()
            except REDIS_FAILURES as exc:
                self._went_down(exc)

    def _went_down(self, exc: BaseException) -> None:
        if not self._up:
            return
        self._up = False
        self.outages += 1
        log.warning("Redis unavailable (%s): keeping the worker's state locally, retrying", exc)
        self._recovery = asyncio.create_task(self._recover(), name="agent-redis-recovery")

    async def _recover(self) -> None:
        delay_s = _RETRY_FIRST_S
        while True:
            await asyncio.sleep(delay_s)  # backoff between attempts, not synchronization
            delay_s = min(delay_s * 2, self._config.redis_retry_max_s)
            async with self._lock:
                try:
                    await self._redis.ping()
                except REDIS_FAILURES:
                    continue
                # Copy and flip together (no await between): a view change after this point
                # queues behind the lock and is written after the snapshot.
                snapshot = sorted(self.view)
                self._up = True
                try:
                    heartbeat = self._redis.pipeline(transaction=False)
                    self._fill_heartbeat(heartbeat)
                    await heartbeat.execute()
                    pipe = self._redis.pipeline(transaction=True)
                    self._fill_snapshot(pipe, snapshot)
                    await pipe.execute()
                except REDIS_FAILURES:
                    self._up = False
                    continue
            log.info("Redis is back: re-registered, rewrote %d cached blocks", len(snapshot))
            self._recovery = None
            return
