"""Follows the workers' KV events in Redis into each precise pool's index.

Agents mirror each worker's block set into Redis (`state.keys`: the pool's sharded KV streams and
each worker's snapshot set). For every pool in precise mode the follower builds its view the way
keys.py prescribes: read each stream's last id first, then every registered worker's snapshot, then
read the streams from those ids (`stream_reader`) and apply each entry (stored, removed, cleared) to
the pool's `PreciseIndex`. Entries name the agent's worker id; the gateway's worker is the
discovered worker of that id, or the YAML worker the agent was matched to by URL
(`Worker.agent_id`). A worker that joins the pool later (discovered, or its agent found) gets its
snapshot loaded then, so entries skipped while nobody could map them are not lost. The follower
rebuilds a pool's view when the pool's index is replaced (config reload), when it fell behind the
stream's trimming, and after Redis failed: while Redis is down the index keeps the last view (and
the gateway keeps routing on it), and when Redis answers again every view is rebuilt from the
snapshots. A malformed entry is skipped (logged once per cause), never the end of the follower. It
has its own connection, with timeouts long enough for a large snapshot (the request path's are
short).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from router.domain.pool import Pool
from router.domain.registry import Registry
from router.logs import LogOnce
from router.metrics import GatewayMetrics
from router.routing.precise_index import (
    CLEARED,
    REMOVED,
    STORED,
    FollowsKVEvents,
    PreciseIndex,
)
from router.state.keys import Keys
from router.state.redis_client import REDIS_FAILURES, RedisClient, connect
from router.state.redis_state import stop_if_cancelled
from router.state.stream_reader import StreamReader

log = logging.getLogger("prefix_router.kv_follower")

_COUNT = 1000  # entries per XREAD; a full reply means the follower may be lagging
_POLL_S = 0.01
"""Between XREADs that found nothing (also the cadence of the new-worker check): the floor of
the events' lag; 100 empty reads a second cost the gateway well under 1% of a core."""
_NO_POOL_S = 1.0
"""With no precise pool to follow, how often to look again for one (a reload may add it):
polling at `_POLL_S` for nothing cost an idle Redis-backed gateway 100 wake-ups a second."""
_RETRY_S = 0.5
_OPS = (STORED, REMOVED, CLEARED)


@dataclass
class _View:
    index: PreciseIndex
    workers: set[str] = field(default_factory=set)
    """Gateway worker ids whose snapshot this view has loaded (or that were present at resync)."""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _ints(raw: Sequence[Any] | bytes | str) -> list[int]:
    items = raw.split() if isinstance(raw, bytes | str) else raw
    out = []
    for item in items:
        try:
            out.append(int(item))
        except ValueError:
            continue  # a malformed hash names no block of ours
    return out


class KVFollower:
    def __init__(
        self,
        registry: Registry,
        redis_url: str,
        keys: Keys,
        metrics: GatewayMetrics | None = None,
        timeout_s: float = 1.0,
        cluster: bool = False,
    ) -> None:
        self._registry = registry
        self._metrics = metrics
        self._url = redis_url
        self._keys = keys
        self._timeout_s = timeout_s
        self._cluster = cluster
        self._views: dict[str, _View] = {}
        self._reader = StreamReader(_COUNT)
        self._bad_entries = LogOnce(log)

    async def run(self) -> None:
        # No hidden retries (`connect`): the loop retries, and logs it.
        client = connect(self._url, cluster=self._cluster, timeout_s=self._timeout_s)
        down = False
        try:
            while True:
                try:
                    busy = await self._step(client)
                except REDIS_FAILURES as exc:
                    stop_if_cancelled()
                    if not down:
                        log.warning("KV events unavailable (%s): routing on the last view", exc)
                        down = True
                    self._views.clear()  # rebuild from snapshots once Redis answers
                    self._reader.clear()
                    await asyncio.sleep(_RETRY_S)  # the retry cadence during an outage
                    continue
                stop_if_cancelled()
                if down:
                    log.info("KV events followed again; views rebuilt from snapshots")
                    down = False
                if not busy:
                    await asyncio.sleep(self.idle_s())
        finally:
            try:
                async with asyncio.timeout(1.0):
                    await client.aclose()
            except REDIS_FAILURES:
                pass

    def idle_s(self) -> float:
        """The wait after a round that found nothing: the polling cadence while a precise pool
        is followed (`_views` holds one view per such pool), a slow look-out otherwise."""
        return _POLL_S if self._views else _NO_POOL_S

    def _precise_pools(self) -> dict[str, tuple[Pool, PreciseIndex]]:
        found = {}
        for name, pool in self._registry.pools.items():
            policy = pool.policy
            if isinstance(policy, FollowsKVEvents) and policy.precise is not None:
                found[name] = (pool, policy.precise)
        return found

    @staticmethod
    def _mapping(pool: Pool) -> dict[str, str]:
        """Agent id -> the gateway's worker id, for the pool's current workers."""
        mapping = {w.id: w.id for w in pool.workers if w.discovered}
        for w in pool.workers:
            if w.agent_id is not None:
                mapping[w.agent_id] = w.id
        return mapping

    async def _step(self, client: RedisClient) -> bool:
        """One round: (re)build views as needed, then read and apply one batch of entries;
        whether it found any."""
        pools = self._precise_pools()
        for name in [n for n in self._views if n not in pools]:
            del self._views[name]
            for stream in self._keys.kv_streams(name):
                self._reader.forget(stream)
        if not pools:
            return False  # nothing to follow (until a reload adds a precise pool)
        for name, (pool, index) in pools.items():
            view = self._views.get(name)
            if view is None or view.index is not index:
                await self._resync(client, name, pool, index)
            else:
                await self._load_new_workers(client, name, pool, view)
        batches = await self._reader.read(client)
        if not batches:
            return False
        pool_of = {stream: name for name in pools for stream in self._keys.kv_streams(name)}
        for stream, entries in batches:
            name = pool_of.get(stream, "")
            view = self._views.get(name)
            if view is None or name not in pools:
                continue
            mapping = self._mapping(pools[name][0])
            applied = 0
            for _entry_id, fields in entries:
                try:
                    applied += self._apply(view.index, mapping, fields)
                except (UnicodeDecodeError, AttributeError, TypeError) as exc:
                    # One agent's bad entry is skipped; the stream goes on being followed.
                    self._bad_entries.warning(
                        name, type(exc).__name__, "KV event in %s skipped: malformed entry", name
                    )
            if self._metrics is not None and entries:
                self._count(name, entries, applied)
            if len(entries) >= _COUNT and await self._reader.trimmed_past(client, stream):
                log.warning("KV follower of %s fell behind the stream's trimming", name)
                await self._resync(client, name, *pools[name])
        return True

    def _apply(self, index: PreciseIndex, mapping: dict[str, str], fields: Any) -> int:
        """Apply one entry; the block events it held (a clear counts one)."""
        agent = fields.get(b"worker")
        op = _text(fields.get(b"op", b""))
        worker_id = mapping.get(_text(agent)) if agent is not None else None
        if worker_id is None or op not in _OPS:
            return 0  # an agent of no current worker: its snapshot is loaded when it joins
        hashes = _ints(fields.get(b"hashes", b""))
        index.apply(worker_id, op, hashes)
        return len(hashes) or 1

    def _count(self, pool: str, entries: list[tuple[Any, Any]], applied: int) -> None:
        """Block events applied, and their lag: a stream entry's id is the Redis clock's
        milliseconds when the agent wrote it (compared with this host's clock: keep them in
        NTP sync). The batch's first and last entries stand for it."""
        assert self._metrics is not None
        self._metrics.kv_events_applied.labels(pool).inc(applied)
        lag = self._metrics.kv_event_lag.labels(pool)
        now_ms = time.time() * 1000
        for entry_id, _ in (entries[0], entries[-1]):
            millis = _text(entry_id).partition("-")[0]
            if millis.isdigit():
                lag.observe(max(0.0, now_ms - int(millis)) / 1000)

    async def _resync(
        self, client: RedisClient, name: str, pool: Pool, index: PreciseIndex
    ) -> None:
        # The streams' positions first, then the snapshots: entries after them that a snapshot
        # already reflects are set operations, so replaying them changes nothing.
        last_ids = await self._reader.tail_ids(client, self._keys.kv_streams(name))
        mapping = self._mapping(pool)
        snapshots = await self._snapshots(client, name, list(mapping))
        index.reset_confirmed()
        for agent, hashes in snapshots.items():
            index.load_snapshot(mapping[agent], hashes)
        self._views[name] = _View(index, set(mapping.values()))
        self._reader.positions.update(last_ids)

    async def _load_new_workers(
        self, client: RedisClient, name: str, pool: Pool, view: _View
    ) -> None:
        mapping = self._mapping(pool)
        new = {agent: wid for agent, wid in mapping.items() if wid not in view.workers}
        view.workers &= set(mapping.values())  # a worker that left and returns is new again
        if not new:
            return
        snapshots = await self._snapshots(client, name, list(new))
        for agent, hashes in snapshots.items():
            view.index.load_snapshot(new[agent], hashes)
        view.workers.update(new.values())

    async def _snapshots(
        self, client: RedisClient, pool: str, agents: list[str]
    ) -> dict[str, list[int]]:
        if not agents:
            return {}
        pipe = client.pipeline(transaction=False)
        for agent in agents:
            pipe.smembers(self._keys.kv_snapshot(pool, agent))
        replies = await pipe.execute()
        return {agent: _ints(list(members)) for agent, members in zip(agents, replies, strict=True)}
