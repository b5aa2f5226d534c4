"""The KV-event follower polls Redis only while a precise pool needs its events (real Redis)."""

from __future__ import annotations

from router.domain.registry import Registry
from router.routing.factory import PoolRoutingFactory
from router.state.keys import Keys
from router.state.kv_follower import _NO_POOL_S, _POLL_S, KVFollower
from router.state.redis_client import connect
from tests.conftest import gateway_config


async def test_the_follower_polls_fast_only_for_a_precise_pool(redis_url: str) -> None:
    approximate = Registry(gateway_config(["http://127.0.0.1:9"]), PoolRoutingFactory())
    precise = Registry(
        gateway_config([], pool={"precise": {"tokenizer": "word"}}), PoolRoutingFactory()
    )
    client = connect(redis_url, cluster=False, timeout_s=1.0)
    try:
        idle = KVFollower(approximate, redis_url, Keys())
        assert not await idle._step(client)
        # Nothing to follow: it looks for a precise pool (a reload may add one) once a second,
        # not 100 times.
        assert idle.idle_s() == _NO_POOL_S > 10 * _POLL_S
        following = KVFollower(precise, redis_url, Keys())
        await following._step(client)
        assert following.idle_s() == _POLL_S
    finally:
        await client.aclose()
