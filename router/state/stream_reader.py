"""Follow a changing set of Redis streams from where each was left: one XREAD for all of them
(on Redis Cluster, one per hash slot, sent together in one pipeline).

Both stream followers (other replicas' index inserts, agents' KV events) read through this. It
polls with non-blocking XREADs rather than blocking in one: a blocking read outlives the
client's short socket timeout, and redis-py may swallow a cancellation that lands inside it, so
a stop would not always stop. Positions are stream entry ids; a stream joins at its tail (what
came before predates this follower's view) or at a position the caller read itself.
"""

from __future__ import annotations

from typing import Any

from router.state.redis_client import RedisClient, slot_groups

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
    async def tail_ids(client: RedisClient, streams: list[str]) -> dict[str, str]:
        """The id of each stream's newest entry ("0-0" for an empty or absent stream), in one
        round trip."""
        pipe = client.pipeline(transaction=False)
        for stream in streams:
            pipe.xrevrange(stream, count=1)
        replies: Any = await pipe.execute() if streams else []
        return {
            stream: _text(newest[0][0]) if newest else "0-0"
            for stream, newest in zip(streams, replies, strict=True)
        }

    async def join_at_tail(self, client: RedisClient, streams: list[str]) -> None:
        self.positions.update(await self.tail_ids(client, streams))

    def forget(self, stream: str) -> None:
        self.positions.pop(stream, None)

    def clear(self) -> None:
        """Forget every position (after an outage, streams are joined again)."""
        self.positions.clear()

    async def read(self, client: RedisClient) -> list[tuple[str, list[Entry]]]:
        """The next entries of every followed stream, each stream's position moved past them."""
        if not self.positions:
            return []
        groups = slot_groups(list(self.positions), client)
        if len(groups) == 1:
            replies: Any = await client.xread(self._streams(groups[0]), count=self.count)
        else:
            pipe = client.pipeline(transaction=False)
            for group in groups:
                pipe.xread(self._streams(group), count=self.count)
            replies = [reply for found in await pipe.execute() for reply in found or []]
        batches = []
        for stream, entries in replies or []:
            name = _text(stream)
            decoded = [(_text(entry_id), fields) for entry_id, fields in entries]
            if decoded and name in self.positions:
                self.positions[name] = decoded[-1][0]
                batches.append((name, decoded))
        return batches

    def _streams(self, group: list[str]) -> Any:
        return {stream: self.positions[stream] for stream in group}

    async def trimmed_past(self, client: RedisClient, stream: str) -> bool:
        """Whether the stream's oldest entry is newer than this reader's position: entries
        were trimmed before they were read, so the follower must rebuild its view."""
        first: Any = await client.xrange(stream, count=1)
        position = self.positions.get(stream, "0-0")
        return bool(first) and entry_order(_text(first[0][0])) > entry_order(position)
