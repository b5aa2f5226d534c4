"""The admin API on a real gateway and simulated workers: keys, listings, drain, reload."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import yaml

from router.auth import hash_key
from router.http.context import STATE
from router.serve import start_gateway
from tests.conftest import MODEL, GatewayFactory, SimFactory, chat_body, gateway_config, wait_for

ADMIN = "pr-admin-key-0123456789"
USER = "pr-user-key-0123456789"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}
USER_HEADERS = {"Authorization": f"Bearer {USER}"}


def _auth() -> dict[str, object]:
    return {
        "enabled": True,
        "keys": [
            {"tenant": "ops", "sha256": hash_key(ADMIN), "admin": True},
            {"tenant": "app", "sha256": hash_key(USER)},
        ],
    }


async def _requests_seen(http: aiohttp.ClientSession, worker_url: str) -> int:
    async with http.get(worker_url + "/sim/counters") as resp:
        counters: dict[str, Any] = await resp.json()
    return int(counters["requests"])


async def test_admin_needs_an_admin_key(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    workers = await sims(1)
    url = await gateway(gateway_config([w.url for w in workers], auth=_auth()))
    calls = [
        ("GET", "/admin/workers"),
        ("GET", "/admin/pools"),
        ("POST", f"/admin/workers/{MODEL}/0/drain"),
        ("POST", f"/admin/workers/{MODEL}/0/undrain"),
        ("POST", "/admin/reload"),
    ]
    for method, path in calls:
        async with http.request(method, url + path) as resp:
            assert resp.status == 401, path
            assert (await resp.json())["error"]["code"] == "invalid_api_key"
        async with http.request(method, url + path, headers=USER_HEADERS) as resp:
            assert resp.status == 403, path
            assert (await resp.json())["error"]["code"] == "admin_required"
    async with http.get(url + "/admin/workers", headers=ADMIN_HEADERS) as resp:
        assert resp.status == 200


async def test_listings_and_drain_stop_routing_to_a_worker(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    workers = await sims(2)
    config = gateway_config(
        [w.url for w in workers], auth=_auth(), pool={"policy": {"name": "round_robin"}}
    )
    url = await gateway(config)

    async with http.get(url + "/admin/workers", headers=ADMIN_HEADERS) as resp:
        listed = (await resp.json())["workers"]
    assert [w["id"] for w in listed] == [f"{MODEL}/0", f"{MODEL}/1"]
    first = listed[0]
    assert first["url"] == workers[0].url and first["pool"] == MODEL
    assert first["health"] == "healthy" and first["routable"] is True
    assert first["draining"] is False and first["in_flight"] == 0
    assert first["ejections"] == 0 and first["ejected_for_s"] == 0
    assert first["consecutive_failures"] == 0
    assert {"running", "waiting", "kv_usage", "age_s"} <= set(first["reported_load"])
    assert {"cache_capacity_blocks", "block_size"} <= set(first)

    async with http.get(url + "/admin/pools", headers=ADMIN_HEADERS) as resp:
        (pool,) = (await resp.json())["pools"]
    assert pool["name"] == MODEL and pool["policy"] == {"name": "round_robin"}
    assert pool["workers"] == [f"{MODEL}/0", f"{MODEL}/1"]
    assert pool["healthy_workers"] == 2 and pool["in_flight"] == 0

    async with http.post(url + "/admin/workers/nope/drain", headers=ADMIN_HEADERS) as resp:
        assert resp.status == 404
        error = (await resp.json())["error"]
        assert error["code"] == "worker_not_found" and set(error) >= {"message", "type"}

    async with http.post(url + f"/admin/workers/{MODEL}/0/drain", headers=ADMIN_HEADERS) as r:
        assert r.status == 200
        drained = await r.json()
    assert drained["draining"] is True and drained["routable"] is False

    before = [await _requests_seen(http, w.url) for w in workers]
    for i in range(6):
        body = chat_body(f"question {i}", stream=i % 2 == 0)
        async with http.post(url + "/v1/chat/completions", json=body, headers=USER_HEADERS) as r:
            assert r.status == 200
            await r.read()
    after = [await _requests_seen(http, w.url) for w in workers]
    assert after[0] == before[0], "a drained worker got new requests"
    assert after[1] == before[1] + 6

    async with http.post(url + f"/admin/workers/{MODEL}/0/undrain", headers=ADMIN_HEADERS) as r:
        assert (await r.json())["routable"] is True
    for i in range(4):
        async with http.post(url + "/v1/chat/completions", json=chat_body(f"again {i}")) as r:
            assert r.status == 401  # the user key is still needed
        async with http.post(
            url + "/v1/chat/completions", json=chat_body(f"again {i}"), headers=USER_HEADERS
        ) as r:
            assert r.status == 200
    assert await _requests_seen(http, workers[0].url) > after[0]


async def test_reload_through_the_admin_api(
    sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    workers = await sims(2)
    path = tmp_path / "routing.yaml"
    config = gateway_config([workers[0].url])
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    runner, url = await start_gateway(config, str(path))
    try:
        path.write_text("pools: {broken: [")
        async with http.post(url + "/admin/reload") as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
            assert error["code"] == "invalid_config"
        data = config.model_dump(mode="json")
        data["pools"][MODEL]["workers"].append({"url": workers[1].url})
        path.write_text(yaml.safe_dump(data))
        async with http.post(url + "/admin/reload") as resp:
            assert resp.status == 200
            assert (await resp.json())["workers"] == 2
        pool = runner.app[STATE].registry.pools[MODEL]
        await wait_for(lambda: all(w.routable for w in pool.workers), what="added worker routable")
    finally:
        await runner.cleanup()
