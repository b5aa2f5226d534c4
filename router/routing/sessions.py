"""Sticky sessions: a bounded, expiring map from session id to the worker that served it last.

Session ids come from clients (`X-Session-Id`, the body's `user`), so the map is bounded by
entries (least recently used go first) and by idle time. It is in-memory per gateway; a later
Redis backing keeps the same three calls, which is why the interface stays this small.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class SessionTable:
    def __init__(
        self,
        max_entries: int,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_entries = max_entries
        self._ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def get(self, session_id: str) -> str | None:
        """The worker id this session last used, if remembered and not expired."""
        entry = self._entries.get(session_id)
        if entry is None:
            return None
        worker_id, expires_at = entry
        if expires_at <= self._clock():
            del self._entries[session_id]
            return None
        self._entries.move_to_end(session_id)
        return worker_id

    def put(self, session_id: str, worker_id: str) -> None:
        """Remember (and refresh) the session's worker."""
        self._entries[session_id] = (worker_id, self._clock() + self._ttl_s)
        self._entries.move_to_end(session_id)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def forget_worker(self, worker_id: str) -> None:
        """Drop every session pinned to a worker that left (rare, so a scan is fine)."""
        stale = [s for s, (w, _) in self._entries.items() if w == worker_id]
        for session_id in stale:
            del self._entries[session_id]

    def __len__(self) -> int:
        return len(self._entries)
