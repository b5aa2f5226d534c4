"""Sticky sessions: a bounded, expiring map from session id to the worker that served it last.

Session ids come from clients (`X-Session-Id`, the body's `user`), so the map is bounded by
entries (least recently used go first) and by idle time. It is in-memory per gateway; the fleet
state shares sessions between replicas (`state.fleet_sync`), and policies prefer that answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from router.expiring import ExpiringLRU


class SessionTable:
    def __init__(
        self,
        max_entries: int,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl_s = ttl_s
        self._entries: ExpiringLRU[str] = ExpiringLRU(max_entries, clock)

    def get(self, session_id: str) -> str | None:
        """The worker id this session last used, if remembered and not expired."""
        return self._entries.get(session_id)

    def put(self, session_id: str, worker_id: str) -> None:
        """Remember (and refresh) the session's worker."""
        self._entries.put(session_id, worker_id, self._ttl_s)

    def forget_worker(self, worker_id: str) -> None:
        """Drop every session pinned to a worker that left."""
        self._entries.drop_values(lambda pinned: pinned == worker_id)

    def __len__(self) -> int:
        return len(self._entries)
