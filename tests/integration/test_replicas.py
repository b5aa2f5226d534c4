"""Two gateway replicas on one Redis behave like one: a session's next turn follows it."""

from __future__ import annotations

from functools import partial
from typing import Any

import aiohttp
from aiohttp import web

from router.config import IndexConfig
from router.http.context import STATE
from router.routing.hybrid import HybridCost
from router.routing.key import extend_key, routing_key
from router.routing.prefix_index import key_scheme
from tests.conftest import MODEL, GatewayFactory, SimFactory, chat_body, gateway_config, wait_for
from tests.integration.conftest import AppGateways

SCHEME = key_scheme(IndexConfig())


def _state(url: str) -> dict[str, object]:
    return {"backend": "redis", "redis_url": url, "timeout_s": 0.2}


async def test_second_turn_on_replica_b_lands_where_replica_a_routed(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession, redis_url: str
) -> None:
    workers = await sims(4)
    urls = []
    for _ in range(2):
        config = gateway_config(
            [w.url for w in workers], state=_state(redis_url), debug_headers=True
        )
        urls.append(await gateway(config))
    a, b = urls
    for url in urls:
        await wait_for(partial(_all_ready, http, url, 4), what="replica sees 4 workers")
    for n in range(6):
        session = {"X-Session-Id": f"conversation-{n}"}
        first = chat_body(f"session {n} opening question about topic {n * 7}")
        async with http.post(a + "/v1/chat/completions", json=first, headers=session) as resp:
            assert resp.status == 200
            chosen = resp.headers["X-Route-Worker"]
            answer = (await resp.json())["choices"][0]["message"]["content"]
        second = {
            **first,
            "messages": [
                *first["messages"],
                {"role": "assistant", "content": answer},
                {"role": "user", "content": "and a follow-up"},
            ],
        }

        async with http.post(b + "/v1/chat/completions", json=second, headers=session) as resp:
            assert resp.status == 200
            assert resp.headers["X-Route-Worker"] == chosen, f"session {n} did not follow"


async def _all_ready(http: aiohttp.ClientSession, url: str, n: int) -> bool:
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
    healthy = [ln for ln in text.splitlines() if ln.startswith("prefix_router_worker_healthy{")]
    return len(healthy) == n and all(ln.endswith(" 1.0") for ln in healthy)


async def test_inserts_for_an_unknown_worker_or_keyed_otherwise_are_ignored(
    sims: SimFactory, redis_url: str
) -> None:
    import redis.asyncio as aioredis

    from router.serve import start_gateway
    from router.state.keys import Keys

    (worker,) = await sims(1)
    runner, _ = await start_gateway(gateway_config([worker.url], state=_state(redis_url)))
    redis = aioredis.Redis.from_url(redis_url)
    try:
        state = runner.app[STATE]
        policy = state.registry.pools[MODEL].policy
        assert isinstance(policy, HybridCost)
        known = state.registry.pools[MODEL].workers[0].id

        async def inserts_applied() -> bool:
            # Another replica's inserts: one for a worker that left (or never was), one for
            # ours; sent again until the follower (joining the streams' tails as it starts)
            # applied ours.
            # Keys made another way (an older release's hash) come first: they name no prefix
            # here and must not be indexed.
            inserts = (
                ("gone-worker", SCHEME, "11 12 13"),
                (known, "crc32-adler32/64/16", "31 32 33"),
                (known, SCHEME, "21 22 23"),
            )
            for worker_id, scheme, keys in inserts:
                entry = {"replica": "other", "worker": worker_id, "scheme": scheme, "keys": keys}
                stream = Keys().index_stream_of(MODEL, worker_id)
                await redis.xadd(stream, entry)  # type: ignore[arg-type]
            return policy.index.blocks_of(known) > 0

        await wait_for(inserts_applied, what="the known worker's insert applied")
        assert "gone-worker" not in policy.index.stats().blocks_per_worker
        assert policy.index.match([21, 22, 23]) == {known: 3}
        assert policy.index.match([31, 32, 33]) == {}, "an insert keyed otherwise was indexed"
    finally:
        await runner.cleanup()
        await redis.aclose()


async def _two_replicas_one_worker(
    sims: SimFactory, app_gateways: AppGateways, redis_url: str
) -> tuple[str, web.Application, HybridCost, str]:
    """Replica a's URL and app, replica b's policy, and the id of the one worker behind both."""
    (worker,) = await sims(1)
    config = gateway_config([worker.url], state=_state(redis_url))
    (a, app_a), (_, app_b) = [await app_gateways(config) for _ in range(2)]
    policy_b = app_b[STATE].registry.pools[MODEL].policy
    assert isinstance(policy_b, HybridCost)
    return a, app_a, policy_b, app_b[STATE].registry.pools[MODEL].workers[0].id


async def test_the_answer_one_replica_indexed_reaches_the_others(
    sims: SimFactory, app_gateways: AppGateways, http: aiohttp.ClientSession, redis_url: str
) -> None:
    """vLLM caches the answer's blocks too; a conversation's next turn that lands on another
    replica must match the whole history there, not just the previous prompt."""
    a, _, policy_b, worker_id = await _two_replicas_one_worker(sims, app_gateways, redis_url)
    first = chat_body(" ".join(f"history{i}" for i in range(120)), max_tokens=64)
    async with http.post(a + "/v1/chat/completions", json=first) as resp:
        assert resp.status == 200
        answer = (await resp.json())["choices"][0]["message"]["content"]
    prompt_key = routing_key(first, "chat")
    with_answer = extend_key(prompt_key, answer, chat=True)
    index = policy_b.index
    whole = len(index.block_keys(with_answer))
    assert whole > len(index.block_keys(prompt_key)), "the answer spans no block of its own"
    await wait_for(
        lambda: index.match(index.block_keys(with_answer)).get(worker_id, 0) == whole,
        what="replica b knows the worker holds prompt and answer",
    )


async def test_a_decision_shares_the_prefill_it_queues_and_the_others_count_it(
    sims: SimFactory, app_gateways: AppGateways, http: aiohttp.ClientSession, redis_url: str
) -> None:
    """A replica's routing decision says how many tokens it sent the worker to compute; the
    other replicas queue their estimates behind them (a waiting count in the worker's report
    prices a long prompt at a fraction of its prefill)."""
    import redis.asyncio as aioredis

    from router.state.keys import Keys

    a, app_a, policy_b, worker_id = await _two_replicas_one_worker(sims, app_gateways, redis_url)
    stream = Keys().index_stream_of(MODEL, worker_id)
    redis = aioredis.Redis.from_url(redis_url)
    try:
        prompt = chat_body(" ".join(f"cold{i}" for i in range(400)))
        async with http.post(a + "/v1/chat/completions", json=prompt) as resp:
            assert resp.status == 200
        replica_a = app_a[STATE].fleet.replica

        async def shared_prefill() -> int:
            entries: Any = await redis.xrange(stream)  # redis-py's reply type is a union
            for _id, fields in entries:
                if fields[b"replica"] == replica_a.encode() and b"prefill" in fields:
                    return int(fields[b"prefill"])
            return 0

        async def decision_shared() -> bool:
            return await shared_prefill() > 0

        await wait_for(decision_shared, what="replica a's decision in the stream")
        assert 300 < await shared_prefill() <= 1200  # the cold prompt's tokens, about
        # Another replica's decision queued far more there than drains while we look.
        entry = {
            "replica": "other",
            "worker": worker_id,
            "scheme": SCHEME,
            "keys": "41 42",
            "prefill": "100000000",
        }
        await redis.xadd(stream, entry)  # type: ignore[arg-type]
        now = policy_b.recent.now

        def queued_behind() -> bool:
            return policy_b.peer_backlog.tokens(worker_id, now(), 20_000.0) > 1e7

        await wait_for(queued_behind, what="replica b counts the other's prefill")
    finally:
        await redis.aclose()
