"""Priority admission and fallback with a real gateway and a slow simulated worker."""

from __future__ import annotations

import asyncio

import aiohttp

from router.auth import hash_key
from tests.conftest import GatewayFactory, SimFactory, chat_body, gateway_config, wait_for

HIGH, LOW = "pr-high-key-000000000000", "pr-low-key-0000000000000"
AUTH = {
    "enabled": True,
    "keys": [
        {"tenant": "gold", "sha256": hash_key(HIGH), "priority": "high"},
        {"tenant": "free", "sha256": hash_key(LOW), "priority": "low"},
    ],
}
# The simulated worker takes its modelled time (tens of ms per request) so a queue forms.
SLOW = {"time_scale": 1.0}


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _queue_depth(http: aiohttp.ClientSession, url: str) -> float:
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("prefix_router_queue_depth{")
    )


async def test_high_priority_overtakes_queued_low_priority(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    workers = await sims(1, **SLOW)
    pool = {"admission": {"max_in_flight_per_worker": 1, "queue_timeout_s": 60}}
    url = await gateway(gateway_config([workers[0].url], pool=pool, auth=AUTH))
    chat = url + "/v1/chat/completions"
    finished: list[str] = []

    async def send(name: str, key: str) -> None:
        async with http.post(chat, json=chat_body(name, max_tokens=12), headers=_bearer(key)) as r:
            assert r.status == 200, await r.text()
            await r.read()
        finished.append(name)

    blocker = asyncio.create_task(send("blocker", LOW))
    await wait_for(
        lambda: workers[0].app is not None and _running(workers[0]) == 1,
        what="the blocker occupies the only slot",
    )
    lows = [asyncio.create_task(send(f"low{i}", LOW)) for i in range(3)]
    await wait_for(lambda: _depth_is(http, url, 3), what="three low requests queued")
    high = asyncio.create_task(send("high", HIGH))
    await wait_for(lambda: _depth_is(http, url, 4), what="the high request queued too")
    await asyncio.gather(blocker, high, *lows)
    assert finished[0] == "blocker"
    assert finished[1] == "high", finished
    assert finished[2:] == ["low0", "low1", "low2"]  # FIFO within a class


def _running(handle: object) -> int:
    from workers.sim.app import SIM_STATE

    app = handle.app  # type: ignore[attr-defined]
    return int(app[SIM_STATE].engine.num_running)


async def _depth_is(http: aiohttp.ClientSession, url: str, n: int) -> bool:
    return await _queue_depth(http, url) == n


async def test_queue_timeout_and_full_queue_are_503_with_retry_after(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    workers = await sims(1, **SLOW)
    pool = {"admission": {"max_in_flight_per_worker": 1, "queue_size": 1, "queue_timeout_s": 0.2}}
    url = await gateway(gateway_config([workers[0].url], pool=pool, auth=AUTH))
    chat = url + "/v1/chat/completions"
    long_body = chat_body("hold the slot", max_tokens=400)
    blocker = asyncio.create_task(http.post(chat, json=long_body, headers=_bearer(LOW)))
    await wait_for(lambda: _running(workers[0]) == 1, what="slot taken")
    queued = asyncio.create_task(http.post(chat, json=chat_body(), headers=_bearer(LOW)))
    await wait_for(lambda: _depth_is(http, url, 1), what="one request queued")
    # Queue full: a low arrival is refused at once; a high one sheds the queued low one.
    async with http.post(chat, json=chat_body(), headers=_bearer(LOW)) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "queue_full"
        assert int(resp.headers["Retry-After"]) >= 1
    high = asyncio.create_task(http.post(chat, json=chat_body(), headers=_bearer(HIGH)))
    shed = await queued
    assert shed.status == 503 and (await shed.json())["error"]["code"] == "shed"
    timed_out = await high  # waits its 0.2 s behind the long request, then gives up
    assert timed_out.status == 503
    assert (await timed_out.json())["error"]["code"] == "queue_timeout"
    assert "Retry-After" in timed_out.headers
    blocker.cancel()


async def test_fallback_pool_serves_when_primary_has_no_worker(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    from router.config import parse_config

    workers = await sims(1)
    config = parse_config(
        {
            "listen": {"host": "127.0.0.1", "port": 0},
            "auth": {"enabled": False},
            "health": {"interval_s": 0.2},
            "pools": {
                "primary": {
                    "workers": [{"url": "http://127.0.0.1:9"}],
                    "fallback_pools": ["test-llm"],
                },
                "test-llm": {"workers": [{"url": workers[0].url}]},
            },
        }
    )
    url = await gateway(config)
    async with http.post(url + "/v1/chat/completions", json=chat_body(model="primary")) as r:
        assert r.status == 200
        assert (await r.json())["model"] == "test-llm"


async def test_a_fallback_pool_keeps_the_tenants_allow_list_and_its_own_limits(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    from router.auth import hash_key
    from router.config import parse_config

    workers = await sims(1)
    keys = [
        {"tenant": "wide", "sha256": hash_key("key-wide-0000000000"), "models": ["*"]},
        {"tenant": "narrow", "sha256": hash_key("key-narrow-000000000"), "models": ["primary"]},
    ]
    config = parse_config(
        {
            "listen": {"host": "127.0.0.1", "port": 0},
            "auth": {"enabled": True, "keys": keys},
            "health": {"interval_s": 0.2},
            "pools": {
                "primary": {
                    "workers": [{"url": "http://127.0.0.1:9"}],
                    "fallback_pools": ["test-llm"],
                },
                "test-llm": {"workers": [{"url": workers[0].url}], "max_tokens_limit": 8},
            },
        }
    )
    url = await gateway(config)
    chat = url + "/v1/chat/completions"

    async def status(key: str, max_tokens: int) -> int:
        headers = {"Authorization": f"Bearer {key}"}
        body = chat_body(model="primary", max_tokens=max_tokens)
        async with http.post(chat, json=body, headers=headers) as r:
            return r.status

    assert await status("key-wide-0000000000", 4) == 200
    assert await status("key-narrow-000000000", 4) == 503  # may not use the fallback's model
    assert await status("key-wide-0000000000", 100) == 503  # over the fallback's own limit


async def _depths(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("prefix_router_queue_depth{"):
            priority = line.split('priority="', 1)[1].split('"', 1)[0]
            out[priority] = out.get(priority, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


async def test_priority_header_is_honoured_only_for_allowed_keys(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    steering = "pr-steering-key-0000000000"
    auth = {
        "enabled": True,
        "keys": [
            *AUTH["keys"],  # type: ignore[misc]
            {
                "tenant": "ops",
                "sha256": hash_key(steering),
                "priority": "low",
                "allow_routing_headers": True,
            },
        ],
    }
    workers = await sims(1, **SLOW)
    pool = {"admission": {"max_in_flight_per_worker": 1, "queue_timeout_s": 60}}
    url = await gateway(gateway_config([workers[0].url], pool=pool, auth=auth))
    chat = url + "/v1/chat/completions"
    blocker = asyncio.create_task(
        http.post(chat, json=chat_body(max_tokens=200), headers=_bearer(LOW))
    )
    await wait_for(lambda: _running(workers[0]) == 1, what="slot taken")
    spoof = {**_bearer(LOW), "X-Priority": "high", "X-Tenant": "gold"}
    spoofed = asyncio.create_task(http.post(chat, json=chat_body(), headers=spoof))

    async def queued(priority: str) -> bool:
        return (await _depths(http, url)).get(priority) == 1

    await wait_for(lambda: queued("low"), what="the spoofed request queued as low")
    assert (await _depths(http, url)).get("high", 0) == 0
    allowed = asyncio.create_task(
        http.post(chat, json=chat_body(), headers={**_bearer(steering), "X-Priority": "high"})
    )
    await wait_for(lambda: queued("high"), what="an allowed key may raise its priority")
    for task in (blocker, spoofed, allowed):
        (await task).release()
