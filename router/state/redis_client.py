"""One way to open a connection to the fleet's Redis: a single server or a Redis Cluster.

Every user (the request path's state, the followers, discovery, worker agents) opens its
client here, so they agree on the kind of Redis and on failing fast: no hidden retries with
backoff, since each caller has its own fallback and must learn of an outage at once. A cluster
client is seeded by any one node's URL and learns the rest from it; it follows slot moves and
keeps one retry, so a failover's redirect or a refreshed topology does not fail a command.
"""

from __future__ import annotations

from typing import TypeAlias

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, RedisError

REDIS_FAILURES: tuple[type[BaseException], ...] = (
    RedisError,
    OSError,
    TimeoutError,
    # The cluster client's "no reachable node" is not a RedisError.
    RedisClusterException,
    # redis-py's cluster client (8.1) raises AttributeError ("'NoneType' object has no attribute
    # 'writelines'") when another task tore a node's connections down mid-command, as it does
    # when a master dies. It is a Redis failure like the others, and must fall back like them.
    AttributeError,
)
"""What a Redis call can raise when Redis (or the client's view of it) fails."""

RedisClient: TypeAlias = aioredis.Redis | RedisCluster
AnyPipeline: TypeAlias = Pipeline | ClusterPipeline


def connect(
    url: str, *, cluster: bool, timeout_s: float, decode_responses: bool = False
) -> RedisClient:
    if cluster:
        return RedisCluster.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            decode_responses=decode_responses,
            retry=Retry(NoBackoff(), 1),
        )
    return aioredis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        decode_responses=decode_responses,
        retry_on_timeout=False,
        retry=Retry(NoBackoff(), 0),
    )


def slot_groups(keys: list[str], client: RedisClient) -> list[list[str]]:
    """The keys grouped so each group may go into one multi-key command: all of them on a
    single server, one group per hash slot on a cluster."""
    if not isinstance(client, RedisCluster):
        return [keys] if keys else []
    groups: dict[int, list[str]] = {}
    for key in keys:
        groups.setdefault(key_slot(key.encode()), []).append(key)
    return list(groups.values())
