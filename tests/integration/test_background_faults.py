"""Bad input never stops the background loops for the rest of the fleet.

A tiny aiohttp app plays a broken worker beside a healthy simulated one: `{"data": null}` (or
another wrong shape) from `/v1/models`, NaN or Inf in `/metrics`. The healthy worker stays
routable and its load keeps being scraped; the broken one fails its check. With a real Redis,
malformed registration records (a key of the wrong type, a URL that is not UTF-8, NaN load,
a non-ASCII digit) are skipped and a good registration beside them is still discovered.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from router.config import IndexConfig
from router.domain.worker import Health, Worker
from router.http.context import STATE
from router.routing.prefix_index import key_scheme
from router.serve import start_gateway
from router.state.keys import Keys
from tests.conftest import MODEL, SimFactory, chat_body, gateway_config, wait_for

# What the broken worker answers once it breaks: (the /v1/models body, the /metrics text).
GOOD_MODELS: Any = {"object": "list", "data": [{"id": MODEL, "object": "model"}]}
GOOD_METRICS = "vllm:num_requests_running 1\nvllm:num_requests_waiting 0\n"
BROKEN = {
    "models_data_null": ({"data": None}, GOOD_METRICS),
    "models_unhashable_id": ({"data": [{"id": [MODEL]}]}, GOOD_METRICS),
    "metrics_nan": (GOOD_MODELS, "vllm:num_requests_running NaN\nvllm:kv_cache_usage_perc nan\n"),
    "metrics_inf_and_garbage": (
        GOOD_MODELS,
        'vllm:num_requests_waiting +Inf\nvllm:num_requests_running{x="1"} \x00zz\nvllm:{{}\n',
    ),
}

SCHEME = key_scheme(IndexConfig())


class BrokenWorker:
    """Answers like a worker until `breaks(kind)`, then with one kind of wrong answer."""

    def __init__(self) -> None:
        self.models: Any = GOOD_MODELS
        self.metrics = GOOD_METRICS
        self.hits = {"/health": 0, "/v1/models": 0, "/metrics": 0}
        self.url = ""

    def breaks(self, kind: str) -> None:
        self.models, self.metrics = BROKEN[kind]

    def app(self) -> web.Application:
        async def health(request: web.Request) -> web.Response:
            self.hits["/health"] += 1
            return web.json_response({})

        async def models(request: web.Request) -> web.Response:
            self.hits["/v1/models"] += 1
            return web.json_response(self.models)

        async def metrics(request: web.Request) -> web.Response:
            self.hits["/metrics"] += 1
            return web.Response(text=self.metrics)

        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_get("/v1/models", models)
        app.router.add_get("/metrics", metrics)
        return app


@pytest.fixture
async def broken() -> AsyncIterator[BrokenWorker]:
    worker = BrokenWorker()
    runner = web.AppRunner(worker.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    worker.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield worker
    finally:
        await runner.cleanup()


def _by_url(runner: web.AppRunner, url: str) -> Worker:
    return next(w for w in runner.app[STATE].registry.workers() if w.url == url)


def _restarts(runner: web.AppRunner) -> float:
    metrics = runner.app[STATE].metrics.registry
    return sum(
        s.value
        for m in metrics.collect()
        if m.name == "prefix_router_background_restarts"
        for s in m.samples
        if s.name.endswith("_total")
    )


@pytest.mark.parametrize("broken_from_start", [False, True], ids=["breaks_later", "at_start"])
@pytest.mark.parametrize("kind", sorted(BROKEN))
async def test_a_broken_worker_never_stops_the_checks_of_a_healthy_one(
    sims: SimFactory,
    broken: BrokenWorker,
    http: aiohttp.ClientSession,
    kind: str,
    broken_from_start: bool,
) -> None:
    (sim,) = await sims(1)
    if broken_from_start:
        broken.breaks(kind)
    config = gateway_config(
        [sim.url, broken.url],
        health={"interval_s": 0.05, "timeout_s": 1.0},
        load_scrape={"interval_s": 0.05},
    )
    runner, url = await start_gateway(config)
    try:
        healthy, bad = _by_url(runner, sim.url), _by_url(runner, broken.url)
        await wait_for(lambda: healthy.routable, what="the simulated worker is routable")
        if not broken_from_start:
            await wait_for(
                lambda: bad.routable, what="the other worker is healthy before it breaks"
            )
            broken.breaks(kind)
        path = "/v1/models" if kind.startswith("models") else "/metrics"
        seen = broken.hits[path]
        await wait_for(lambda: broken.hits[path] >= seen + 3, what=f"three broken {path} answers")

        # Both loops are still going: the next rounds probe and scrape everyone.
        probes, scraped_at = broken.hits["/health"], time.monotonic()
        await wait_for(lambda: broken.hits["/health"] >= probes + 3, what="health rounds go on")
        await wait_for(
            lambda: healthy.reported.updated_at > scraped_at, what="the healthy worker's load"
        )
        assert healthy.reported.running == 0  # the simulated worker is idle
        assert healthy.routable
        if kind.startswith("models"):
            await wait_for(lambda: bad.health is Health.UNHEALTHY or not bad.routable)
            for i in range(4):  # everything lands on the healthy worker
                async with http.post(url + "/v1/chat/completions", json=chat_body(f"q{i}")) as resp:
                    assert resp.status == 200, await resp.text()
        else:
            load = bad.reported
            # Non-finite samples are skipped; the series that were fine still count.
            assert load.kv_usage == 0.0 and load.waiting == 0
            assert bad.routable  # a bad /metrics costs the worker its load report, not health
        assert _restarts(runner) == 0, "handled per worker: no exception escaped a loop"
    finally:
        await runner.cleanup()


# Each malformed record the agent protocol can meet, written beside one good registration.
async def _wrong_type(redis: aioredis.Redis, keys: Keys, sim_url: str) -> None:
    await redis.set(keys.worker("a-bad"), "not a hash")


async def _not_utf8(redis: aioredis.Redis, keys: Keys, sim_url: str) -> None:
    await redis.hset(keys.worker("a-bad"), mapping={"url": b"http://\xff\xfe:1", "model": MODEL})


async def _nan_load(redis: aioredis.Redis, keys: Keys, sim_url: str) -> None:
    await redis.hset(keys.worker("a-bad"), mapping={"url": "http://127.0.0.1:9", "model": MODEL})
    await redis.hset(keys.load("a-bad"), mapping={"running": "nan", "waiting": "inf"})


async def _odd_digit(redis: aioredis.Redis, keys: Keys, sim_url: str) -> None:
    await redis.hset(
        keys.worker("a-bad"),
        mapping={"url": "http://127.0.0.1:9", "model": MODEL, "block_size": "²"},
    )


MALFORMED = {
    "wrong_type": _wrong_type,
    "url_not_utf8": _not_utf8,
    "nan_load": _nan_load,
    "non_ascii_digit": _odd_digit,
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
async def test_a_malformed_registration_does_not_stop_discovery_of_a_good_one(
    sims: SimFactory, http: aiohttp.ClientSession, redis_url: str, kind: str
) -> None:
    (sim,) = await sims(1)
    keys = Keys()
    redis = aioredis.Redis.from_url(redis_url)
    state = {"backend": "redis", "redis_url": redis_url, "discovery_interval_s": 0.05}
    runner, url = await start_gateway(gateway_config([], state=state))
    try:
        await redis.sadd(keys.workers(MODEL), "a-bad")
        await MALFORMED[kind](redis, keys, sim.url)
        registry = runner.app[STATE].registry
        # A later registration: discovery must still be running after the bad one was read.
        await redis.hset(keys.worker("gpu-good"), mapping={"url": sim.url, "model": MODEL})
        await redis.hset(keys.load("gpu-good"), mapping={"running": "0", "waiting": "0"})
        await redis.sadd(keys.workers(MODEL), "gpu-good")
        await wait_for(
            lambda: (w := registry.worker("gpu-good")) is not None and w.routable,
            what="the good registration is discovered and healthy",
        )
        async with http.post(url + "/v1/chat/completions", json=chat_body("hi")) as resp:
            assert resp.status == 200, await resp.text()
        bad = registry.worker("a-bad")
        if bad is not None:  # readable apart from its load: present, with a sane report
            assert bad.reported.running == 0 and bad.reported.waiting == 0
            assert bad.reported.block_size is None
        assert _restarts(runner) == 0, "handled per record: no exception escaped discovery"
    finally:
        await runner.cleanup()
        await redis.aclose()


async def test_malformed_stream_entries_are_skipped_and_the_followers_go_on(
    sims: SimFactory, redis_url: str
) -> None:
    """The index-insert stream of other replicas and the agents' KV-event stream: an entry
    whose fields are not UTF-8 is skipped, and the good entry after it still applies."""
    sim, kv_sim = await sims(2)
    keys = Keys()
    redis = aioredis.Redis.from_url(redis_url)
    state = {"backend": "redis", "redis_url": redis_url, "discovery_interval_s": 0.05}
    approximate, _ = await start_gateway(gateway_config([sim.url], state=state))
    precise, _ = await start_gateway(
        gateway_config(
            [], state=state, pool={"precise": {"tokenizer": "word", "speculative_ttl_s": 60}}
        )
    )
    try:
        worker_id = _by_url(approximate, sim.url).id
        index = approximate.app[STATE].registry.pools[MODEL].policy.index  # type: ignore[attr-defined]

        async def insert_after_a_bad_entry() -> bool:
            # Each round writes again: the follower starts at the stream's tail, so entries it
            # had not started following yet are (rightly) never read.
            stream = keys.index_stream_of(MODEL, worker_id)
            await redis.xadd(
                stream, {"replica": b"\xff", "worker": worker_id, "scheme": SCHEME, "keys": "1"}
            )
            await redis.xadd(
                stream, {"replica": "r", "worker": b"\xfe\xff", "scheme": SCHEME, "keys": "1"}
            )
            await redis.xadd(
                stream, {"replica": "other", "worker": worker_id, "scheme": SCHEME, "keys": "5 6 7"}
            )
            return bool(index.blocks_of(worker_id))

        await wait_for(insert_after_a_bad_entry, what="the good index insert applied")

        await redis.hset(keys.worker("gpu-k"), mapping={"url": kv_sim.url, "model": MODEL})
        await redis.sadd(keys.workers(MODEL), "gpu-k")
        registry = precise.app[STATE].registry
        await wait_for(lambda: registry.worker("gpu-k") is not None, what="gpu-k discovered")
        kv_index = registry.pools[MODEL].policy.precise  # type: ignore[attr-defined]

        async def kv_event_after_a_bad_one() -> bool:
            stream = keys.kv_stream_of(MODEL, "gpu-k")
            await redis.xadd(stream, {"worker": b"\xff", "op": "stored", "hashes": "3"})
            await redis.xadd(stream, {"worker": "gpu-k", "op": b"\xfe", "hashes": "3"})
            await redis.xadd(stream, {"worker": "gpu-k", "op": "stored", "hashes": "11 22"})
            return bool(kv_index.holds("gpu-k", 11) and kv_index.holds("gpu-k", 22))

        await wait_for(kv_event_after_a_bad_one, what="the good KV event applied")
        assert _restarts(approximate) == 0 and _restarts(precise) == 0
    finally:
        await approximate.cleanup()
        await precise.cleanup()
        await redis.aclose()
