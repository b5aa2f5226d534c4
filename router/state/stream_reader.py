"""Follow a changing set of Redis streams from where each was left: one XREAD for all of them.

Both stream followers (other replicas' index inserts, agents' KV events) read through this. It
polls with non-blocking XREADs rather than blocking in one: a blocking read outlives the
client's short socket timeout, and redis-py may swallow a cancellation that lands inside it, so
a stop would not always stop. Positions are stream entry ids; a stream joins at its tail (what
came before predates this follower's view) or at a position the caller read itself.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

Entry = tuple[str, Any]
"""An entry id and its fields (bytes keys and values)."""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def entry_order(entry_id: str) -> tuple[int, int]:
    """Stream ids compare as (milliseconds, sequence)."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class StreamReader:
    def __init__(self, count: int = 1000) -> None:
        self.count = count
        """Entries per XREAD; a full reply means the follower may be lagging."""
        self.positions: dict[str, str] = {}
        """Stream key -> id of the last entry delivered."""

    def __contains__(self, stream: str) -> bool:
        return stream in self.positions

    @staticmethod
    async def tail_id(client: aioredis.Redis, stream: str) -> str:
        """The id of the stream's newest entry ("0-0" for an empty or absent stream)."""
        newest: Any = await client.xrevrange(stream, count=1)
        return _text(newest[0][0]) if newest else "0-0"

    async def join_at_tail(self, client: aioredis.Redis, stream: str) -> None:
        self.positions[stream] = await self.tail_id(client, stream)

    def forget(self, stream: str) -> None:
        self.positions.pop(stream, None)

    def clear(self) -> None:
        """Forget every position (after an outage, streams are joined again)."""
        self.positions.clear()

    async def read(self, client: aioredis.Redis) -> list[tuple[str, list[Entry]]]:
        """The next entries of every followed stream, each stream's position moved past them."""
        if not self.positions:
            return []
        replies: Any = await client.xread(self.positions, count=self.count)  # type: ignore[arg-type]
        batches = []
        for stream, entries in replies or []:
            name = _text(stream)
            decoded = [(_text(entry_id), fields) for entry_id, fields in entries]
            if decoded and name in self.positions:
                self.positions[name] = decoded[-1][0]
                batches.append((name, decoded))
        return batches

    async def trimmed_past(self, client: aioredis.Redis, stream: str) -> bool:
        """Whether the stream's oldest entry is newer than this reader's position: entries
        were trimmed before they were read, so the follower must rebuild its view."""
        first: Any = await client.xrange(stream, count=1)
        position = self.positions.get(stream, "0-0")
        return bool(first) and entry_order(_text(first[0][0])) > entry_order(position)
