"""Discovery: workers that agents registered in Redis join their pool; lapsed ones leave.

Every interval, for each pool, the gateway reads the ids registered for the pool's model and
their registration and load records (one pipeline). A new id becomes a worker (unproven until
its first health probe passes); an id whose registration expired (its heartbeat lapsed) leaves
the pool, and requests already on it finish on their own. An agent beside a worker that the
YAML lists already (same URL) only feeds that worker's load. While Redis is down, the last
known fleet stays as it is. A malformed record (a key of the wrong type, bytes that are not
UTF-8, a URL the gateway cannot reach, numbers that are not finite) is skipped on its own and
logged once per cause: it never keeps the other workers of any pool from being discovered.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

from redis.exceptions import ResponseError

from router.config import parse_endpoint
from router.domain.registry import Registry
from router.domain.worker import ReportedLoad, Worker
from router.logs import LogOnce
from router.state.backend import FleetBackend
from router.state.keys import Keys
from router.state.redis_client import REDIS_FAILURES

log = logging.getLogger("prefix_router.discovery")


Record = dict[bytes, bytes]


class MalformedRecord(ValueError):
    """A registration or load record the gateway cannot read; its message is the cause."""


def _text(record: Record, field: str) -> str | None:
    value = record.get(field.encode())
    if value is None:
        return None
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise MalformedRecord(f"{field} is not UTF-8") from None


def _int(record: Record, field: str) -> int | None:
    text = _text(record, field)
    # ASCII only: "²".isdigit() holds, and int() of it raises.
    return int(text) if text is not None and text.isascii() and text.isdigit() else None


def _url(registration: Record) -> str:
    """The registered base URL, if the relay can use it (the same rules as the YAML's)."""
    text = (_text(registration, "url") or "").strip().rstrip("/")
    try:
        parse_endpoint(text)
    except ValueError:
        # The cause is a fixed phrase: the URL itself may hold credentials, never logged.
        raise MalformedRecord("url is not a usable http(s) base URL") from None
    return text


def _load(registration: Record, load: Record) -> ReportedLoad:
    def number(field: str) -> float:
        try:
            value = float(_text(load, field) or 0)
        except ValueError:
            return 0.0
        # A NaN or Inf would poison every score it enters (and int() of one raises).
        return value if math.isfinite(value) and value >= 0 else 0.0

    return ReportedLoad(
        running=int(number("running")),
        waiting=int(number("waiting")),
        kv_usage=number("kv_usage"),
        block_size=_int(registration, "block_size"),
        num_gpu_blocks=_int(registration, "num_gpu_blocks"),
        lora_running=_names(load, "lora_running"),
        lora_waiting=_names(load, "lora_waiting"),
        max_lora=_int(load, "max_lora"),
        updated_at=_scraped_at(number("ts")),
    )


def _scraped_at(ts: float) -> float:
    """When the agent scraped the worker, on this host's monotonic clock (the record's `ts` is
    the agent's unix time; a record without one counts as read now)."""
    now = time.monotonic()
    return now - max(0.0, time.time() - ts) if ts else now


def _names(record: Record, field: str) -> frozenset[str]:
    """A comma-separated list of LoRA adapter names (as vLLM's metric labels hold them)."""
    return frozenset(n for n in (_text(record, field) or "").split(",") if n)


class Discovery:
    def __init__(
        self, registry: Registry, state: FleetBackend, keys: Keys, interval_s: float
    ) -> None:
        self._registry = registry
        self._state = state
        self._keys = keys
        self.interval_s = interval_s
        self._bad = LogOnce(log)

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
                    try:
                        records = await self._read_pool(pool_name)
                    except ResponseError as exc:
                        # Redis answered, but this pool's key is not a set: the others go on.
                        self._bad.warning(
                            f"pool:{pool_name}", "members", "discovery of %s: %s", pool_name, exc
                        )
                        continue
                    self._apply(pool_name, records)
        except REDIS_FAILURES as exc:
            log.debug("discovery skipped a round: %s", exc)

    async def _read_pool(self, pool_name: str) -> dict[str, tuple[Record, Record | None]]:
        """Each registered id's registration and load record (None when the load record
        cannot be read); ids whose registration expired or cannot be read are left out."""
        client = self._state.client
        if client is None:
            return {}
        members = await client.smembers(self._keys.workers(pool_name))
        ids = sorted(i for i in map(_member, members) if i is not None)
        pipe = client.pipeline(transaction=False)
        for worker_id in ids:
            pipe.hgetall(self._keys.worker(worker_id))
            pipe.hgetall(self._keys.load(worker_id))
        # Per-record errors (a key of the wrong type) come back as values, not one raise.
        replies = await pipe.execute(raise_on_error=False) if ids else []
        records: dict[str, tuple[Record, Record | None]] = {}
        lapsed = []
        for i, worker_id in enumerate(ids):
            registration, load = replies[2 * i], replies[2 * i + 1]
            if not isinstance(registration, dict):
                self._skip(worker_id, "registration is not a hash")
                continue
            if registration:
                records[worker_id] = (registration, load if isinstance(load, dict) else None)
            else:
                lapsed.append(worker_id)
        if lapsed:
            # An agent that died leaves its id behind: without this the set only grows. A live
            # agent adds its id back with every heartbeat, after its registration.
            await client.srem(self._keys.workers(pool_name), *lapsed)
        return records

    def _apply(self, pool_name: str, records: dict[str, tuple[Record, Record | None]]) -> None:
        pool = self._registry.pools.get(pool_name)
        if pool is None:
            return
        by_url = {w.url: w for w in pool.workers}
        for worker_id, (registration, load) in records.items():
            try:
                url = _url(registration)
                report = _load(registration, load) if load is not None else None
            except MalformedRecord as exc:
                self._skip(worker_id, str(exc))
                continue
            worker = self._registry.worker(worker_id) or by_url.get(url)
            if worker is None:
                worker = Worker(id=worker_id, url=url, pool=pool_name, discovered=True)
                self._registry.add_worker(worker)
                log.info("worker %s (%s) registered for %s", worker_id, url, pool_name)
            worker.agent_id = worker_id
            if report is not None:
                worker.take_report(report, shared_fleet=True)
            else:
                self._skip(worker_id, "load record is not a hash")
        for worker in list(pool.workers):
            if worker.discovered and worker.id not in records:
                log.info("worker %s left %s: its registration lapsed", worker.id, pool_name)
                self._registry.remove_worker(worker.id)
                self._bad.clear(worker.id)

    def _skip(self, worker_id: str, cause: str) -> None:
        self._bad.warning(
            worker_id, cause, "registration of worker %s skipped: %s", worker_id, cause
        )


def _member(value: bytes | str) -> str | None:
    if isinstance(value, str):
        return value
    try:
        return value.decode()
    except UnicodeDecodeError:
        return None  # an id no agent wrote (agents write UTF-8): nothing to discover
