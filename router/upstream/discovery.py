"""Discovery: workers that agents registered in Redis join their pool; lapsed ones leave.

Every interval, for each pool, the gateway reads the ids registered for the pool's model and
their registration and load records (one pipeline). A new id becomes a worker (unproven until
its first health probe passes); an id whose registration expired (its heartbeat lapsed) leaves
the pool, and requests already on it finish on their own. An agent beside a worker that the
YAML lists already (same URL) only feeds that worker's load. While Redis is down, the last
known fleet stays as it is.
"""

from __future__ import annotations

import asyncio
import logging
import time

from redis.exceptions import RedisError

from router.state.keys import Keys
from router.state.redis_state import RedisState
from router.upstream.registry import Registry
from router.upstream.worker import ReportedLoad, Worker

log = logging.getLogger("prefix_router.discovery")


def _text(record: dict[bytes, bytes], field: str) -> str | None:
    value = record.get(field.encode())
    return value.decode() if value is not None else None


def _int(record: dict[bytes, bytes], field: str) -> int | None:
    text = _text(record, field)
    return int(text) if text is not None and text.isdigit() else None


def _load(registration: dict[bytes, bytes], load: dict[bytes, bytes]) -> ReportedLoad:
    def number(field: str) -> float:
        try:
            return float(_text(load, field) or 0)
        except ValueError:
            return 0.0

    return ReportedLoad(
        running=int(number("running")),
        waiting=int(number("waiting")),
        kv_usage=number("kv_usage"),
        block_size=_int(registration, "block_size"),
        num_gpu_blocks=_int(registration, "num_gpu_blocks"),
        updated_at=time.monotonic(),
    )


class Discovery:
    def __init__(
        self, registry: Registry, state: RedisState, keys: Keys, interval_s: float
    ) -> None:
        self._registry = registry
        self._state = state
        self._keys = keys
        self.interval_s = interval_s

    async def run(self) -> None:
        while True:
            await self.sync_once()
            await asyncio.sleep(self.interval_s)

    async def sync_once(self) -> None:
        client = self._state.client
        if client is None:
            return  # Redis is down: keep the last known fleet
        try:
            async with asyncio.timeout(max(1.0, self.interval_s)):
                for pool_name in list(self._registry.pools):
                    members = await client.smembers(self._keys.workers(pool_name))
                    ids = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)
                    pipe = client.pipeline(transaction=False)
                    for worker_id in ids:
                        pipe.hgetall(self._keys.worker(worker_id))
                        pipe.hgetall(self._keys.load(worker_id))
                    replies = await pipe.execute() if ids else []
                    records = {
                        worker_id: (replies[2 * i], replies[2 * i + 1])
                        for i, worker_id in enumerate(ids)
                        if replies[2 * i]
                    }
                    self._apply(pool_name, records)
        except (RedisError, OSError, TimeoutError) as exc:
            log.debug("discovery skipped a round: %s", exc)

    def _apply(
        self, pool_name: str, records: dict[str, tuple[dict[bytes, bytes], dict[bytes, bytes]]]
    ) -> None:
        pool = self._registry.pools.get(pool_name)
        if pool is None:
            return
        by_url = {w.url: w for w in pool.workers}
        for worker_id, (registration, load) in records.items():
            url = (_text(registration, "url") or "").rstrip("/")
            if not url.startswith(("http://", "https://")):
                continue
            worker = self._registry.worker(worker_id) or by_url.get(url)
            if worker is None:
                worker = Worker(id=worker_id, url=url, pool=pool_name, discovered=True)
                self._registry.add_worker(worker)
                log.info("worker %s (%s) registered for %s", worker_id, url, pool_name)
            worker.agent_id = worker_id
            worker.take_report(_load(registration, load), shared_fleet=True)
        for worker in list(pool.workers):
            if worker.discovered and worker.id not in records:
                log.info("worker %s left %s: its registration lapsed", worker.id, pool_name)
                self._registry.remove_worker(worker.id)
