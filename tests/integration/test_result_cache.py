"""The result cache: exact repeats of deterministic requests never reach a worker again."""

from __future__ import annotations

import aiohttp

from router.auth import hash_key
from tests.conftest import GatewayFactory, SimFactory, chat_body, gateway_config
from tests.sse import read_events

A, B = "pr-tenant-a-key-00000000", "pr-tenant-b-key-00000000"
AUTH = {
    "enabled": True,
    "keys": [{"tenant": "a", "sha256": hash_key(A)}, {"tenant": "b", "sha256": hash_key(B)}],
}


async def _requests_seen(http: aiohttp.ClientSession, sim_url: str) -> int:
    async with http.get(sim_url + "/sim/counters") as resp:
        return int((await resp.json())["requests"])


async def test_repeat_is_served_from_cache_per_tenant(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    (sim,) = await sims(1)
    config = gateway_config([sim.url], auth=AUTH, pool={"result_cache": {"enabled": True}})
    url = await gateway(config)
    chat = url + "/v1/chat/completions"
    body = chat_body("what is the capital of France?", temperature=0)
    as_a = {"Authorization": f"Bearer {A}"}

    async with http.post(chat, json=body, headers=as_a) as resp:
        assert resp.status == 200 and "X-Cache" not in resp.headers
        first = await resp.json()
    assert await _requests_seen(http, sim.url) == 1

    async with http.post(chat, json=body, headers=as_a) as resp:
        assert resp.headers["X-Cache"] == "hit"
        second = await resp.json()
    assert second["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    assert await _requests_seen(http, sim.url) == 1  # never reached the worker

    # The same request streamed is replayed as a valid SSE stream.
    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with http.post(chat, json=stream_body, headers=as_a) as resp:
        assert resp.headers["X-Cache"] == "hit"
        events, done = await read_events(resp)
    assert done
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == first["choices"][0]["message"]["content"]
    assert events[-1]["usage"] == first["usage"]
    assert await _requests_seen(http, sim.url) == 1

    # Another tenant never sees tenant a's cached answer.
    async with http.post(chat, json=body, headers={"Authorization": f"Bearer {B}"}) as resp:
        assert resp.status == 200 and "X-Cache" not in resp.headers
    assert await _requests_seen(http, sim.url) == 2

    # Non-deterministic requests are never cached.
    sampled = chat_body("what is the capital of France?", temperature=0.7)
    for _ in range(2):
        async with http.post(chat, json=sampled, headers=as_a) as resp:
            assert "X-Cache" not in resp.headers
    assert await _requests_seen(http, sim.url) == 4


async def test_streamed_miss_fills_the_cache(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    (sim,) = await sims(1)
    url = await gateway(gateway_config([sim.url], pool={"result_cache": {"enabled": True}}))
    body = chat_body("tell me a story", stream=True, seed=7)
    async with http.post(url + "/v1/chat/completions", json=body) as resp:
        events, done = await read_events(resp)
    assert done
    streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    async with http.post(url + "/v1/chat/completions", json={**body, "stream": False}) as resp:
        assert resp.headers["X-Cache"] == "hit"
        assert (await resp.json())["choices"][0]["message"]["content"] == streamed
    assert await _requests_seen(http, sim.url) == 1
