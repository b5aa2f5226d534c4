"""The one Redis stream reader both followers use, against a real redis-server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from router.state.stream_reader import StreamReader


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    redis = aioredis.Redis.from_url(redis_url)
    yield redis
    await redis.aclose()


async def test_joins_at_the_tail_and_delivers_each_entry_once(client: aioredis.Redis) -> None:
    await client.xadd("a", {"n": "old"})
    reader = StreamReader(count=10)
    await reader.join_at_tail(client, ["a", "b"])  # b is absent: joins at 0-0
    assert await reader.read(client) == []
    await client.xadd("a", {"n": "1"})
    await client.xadd("b", {"n": "2"})
    got = {stream: [f[b"n"] for _, f in entries] for stream, entries in await reader.read(client)}
    assert got == {"a": [b"1"], "b": [b"2"]}
    assert await reader.read(client) == []
    reader.forget("b")
    await client.xadd("b", {"n": "3"})
    assert await reader.read(client) == []


async def test_tells_when_entries_were_trimmed_before_they_were_read(
    client: aioredis.Redis,
) -> None:
    reader = StreamReader(count=10)
    await client.xadd("s", {"n": "0"})
    await reader.join_at_tail(client, ["s"])
    assert not await reader.trimmed_past(client, "s")
    for n in range(5):
        await client.xadd("s", {"n": str(n)})
    await client.xtrim("s", maxlen=2, approximate=False)
    assert await reader.trimmed_past(client, "s")
