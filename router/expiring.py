"""A bounded map whose entries also expire: least recently used go first, stale ones on read.

Anything keyed by request data (sessions, cached answers) must be bounded and evict (DESIGN §9):
this is the one structure that does it, for the routing's session table and the in-memory
state backend alike.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

V = TypeVar("V")


class ExpiringLRU(Generic[V]):
    def __init__(self, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._items: OrderedDict[str, tuple[float, V]] = OrderedDict()
        self._max = max_entries
        self._clock = clock

    def get(self, key: str) -> V | None:
        """The value, if present and not expired (a hit counts as a use)."""
        item = self._items.get(key)
        if item is None:
            return None
        expires, value = item
        if expires <= self._clock():
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return value

    def put(self, key: str, value: V, ttl_s: float) -> None:
        """Remember (and refresh) `key` for `ttl_s`, evicting the least recently used."""
        self._items[key] = (self._clock() + ttl_s, value)
        self._items.move_to_end(key)
        while len(self._items) > self._max:
            self._items.popitem(last=False)

    def drop_values(self, predicate: Callable[[V], bool]) -> None:
        """Drop every entry whose value matches (rare events, so a scan is fine)."""
        stale = [k for k, (_, value) in self._items.items() if predicate(value)]
        for key in stale:
            del self._items[key]

    def __len__(self) -> int:
        return len(self._items)
