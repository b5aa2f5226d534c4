"""What replicas share about routing: session stickiness and approximate index inserts.

Sessions: before routing, the session's worker is read from the shared state (so a turn that lands
on another replica follows the previous one); after routing, the choice is written back in the
background. Index inserts: each replica appends what it recorded for a worker to the worker's shard
of the pool's index streams (`{p}idx:{<model>:<shard>}`, batched, bounded length) and follows the
other replicas' entries into its own index. With the memory backend this all stays local, and while
Redis is down each replica routes on what it knows, then follows again from the stream's tail. A
malformed entry is skipped (logged once per cause), never the end of the follower.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable

from router.domain.policy import SharesInserts
from router.logs import LogOnce
from router.state.backend import StateBackend
from router.state.keys import IDX_STREAM_MAXLEN, SESSION_TTL_S, Keys
from router.state.redis_client import REDIS_FAILURES
from router.state.redis_state import RedisState, stop_if_cancelled
from router.state.stream_reader import StreamReader

log = logging.getLogger("prefix_router.fleet_sync")

_FLUSH_S = 0.02
_POLL_S = 0.05
_MAX_PENDING = 10_000


class FleetSync:
    def __init__(
        self,
        backend: StateBackend,
        keys: Keys,
        index_of: Callable[[str, str], SharesInserts | None],
        session_ttl_s: float = SESSION_TTL_S,
    ) -> None:
        self.replica = uuid.uuid4().hex[:12]
        self._backend = backend
        self._keys = keys
        self._index_of = index_of
        self._session_ttl_s = session_ttl_s
        self._pending: list[tuple[str, str, list[int], int]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._bad_entries = LogOnce(log)

    # -- sessions -------------------------------------------------------------------------------

    async def session_worker(self, pool: str, tenant: str, session: str) -> str | None:
        if not self._backend.shared:
            return None
        return await self._backend.get_session(self._keys.session(pool, tenant, session))

    def remember_session(
        self, pool: str, tenant: str, session: str, worker_id: str, ttl_s: float | None
    ) -> None:
        """Write the session's worker in the background, for `ttl_s` (the pool's
        `session_ttl_s`; the default when its policy has none)."""
        if not self._backend.shared:
            return
        task = asyncio.create_task(
            self._backend.set_session(
                self._keys.session(pool, tenant, session),
                worker_id,
                ttl_s if ttl_s is not None else self._session_ttl_s,
            )
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- index inserts ----------------------------------------------------------------------------

    def publish_insert(
        self, pool: str, worker_id: str, block_keys: list[int], prefill_tokens: int = 0
    ) -> None:
        """Share an index insert; a routing decision's also says how many of its prompt's
        tokens the worker computes (the others queue behind them)."""
        if not isinstance(self._backend, RedisState) or not self._backend.shared:
            return
        if len(self._pending) < _MAX_PENDING:
            self._pending.append((pool, worker_id, block_keys, prefill_tokens))
            self._wake.set()

    async def run_publisher(self) -> None:
        """Flush pending inserts in one pipeline every few milliseconds."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(_FLUSH_S)
            batch, self._pending = self._pending, []
            client = self._backend.client if isinstance(self._backend, RedisState) else None
            if client is None or not batch:
                continue
            pipe = client.pipeline(transaction=False)
            for pool, worker_id, block_keys, prefill_tokens in batch:
                index = self._index_of(pool, worker_id)
                if index is None:
                    continue  # the worker left the pool meanwhile
                entry = {
                    "replica": self.replica,
                    "worker": worker_id,
                    "scheme": index.key_scheme,
                    "keys": " ".join(map(str, block_keys)),
                }
                if prefill_tokens > 0:
                    entry["prefill"] = str(prefill_tokens)
                pipe.xadd(
                    self._keys.index_stream_of(pool, worker_id),
                    entry,  # type: ignore[arg-type]
                    maxlen=IDX_STREAM_MAXLEN,
                    approximate=True,
                )
            with contextlib.suppress(*REDIS_FAILURES):
                async with asyncio.timeout(1.0):
                    await pipe.execute()

    async def run_follower(self, pools: Callable[[], list[str]]) -> None:
        """Apply other replicas' inserts to the local index."""
        reader = StreamReader()
        while True:
            client = self._backend.client if isinstance(self._backend, RedisState) else None
            if client is None:
                reader.clear()  # after an outage, follow from the tail again
                await asyncio.sleep(0.5)
                continue
            try:
                pool_of = {
                    stream: pool for pool in pools() for stream in self._keys.index_streams(pool)
                }
                for stream in [s for s in reader.positions if s not in pool_of]:
                    reader.forget(stream)
                # From the tail: older entries predate this replica's view.
                await reader.join_at_tail(client, [s for s in pool_of if s not in reader])
                batches = await reader.read(client)
            except REDIS_FAILURES as exc:
                stop_if_cancelled()
                log.debug("index follower paused: %s", exc)
                await asyncio.sleep(0.5)
                continue
            stop_if_cancelled()
            if not batches:
                await asyncio.sleep(_POLL_S)
            for stream, entries in batches:
                pool = pool_of[stream]
                for _entry_id, fields in entries:
                    self._apply(pool, fields)

    def _apply(self, pool: str, fields: dict[bytes, bytes]) -> None:
        try:
            replica = fields.get(b"replica", b"").decode()
            scheme = fields.get(b"scheme", b"").decode()
            worker = fields.get(b"worker")
            raw = fields.get(b"keys")
            worker_id = worker.decode() if worker is not None else None
            block_keys = [int(k) for k in raw.split()] if raw is not None else None
            prefill = max(0, int(fields.get(b"prefill", b"0")))  # absent before this field
        except (UnicodeDecodeError, ValueError, AttributeError) as exc:
            # Another writer's bad entry names no block of ours; the next ones still apply.
            self._bad_entries.warning(
                pool, type(exc).__name__, "index insert in %s skipped: malformed entry", pool
            )
            return
        if replica == self.replica:
            return
        if worker_id is None or block_keys is None:
            return
        index = self._index_of(pool, worker_id)
        if index is None:
            return
        if scheme != index.key_scheme:
            self._bad_entries.warning(
                pool,
                "scheme",
                "index inserts in %s from a replica keying prefixes otherwise (%s, here %s) "
                "skipped: a rolling upgrade or a different index config",
                pool,
                scheme[:40] or "unnamed",
                index.key_scheme,
            )
            return
        index.apply_remote_insert(worker_id, block_keys, prefill)
