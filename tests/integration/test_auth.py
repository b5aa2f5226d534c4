"""API keys: 401 without or with a wrong key, 403 for a model the key may not use."""

from __future__ import annotations

import logging

import aiohttp
import pytest

from router.auth import hash_key
from router.cli import main
from router.config import GatewayConfig
from tests.conftest import MODEL, GatewayFactory, SimFactory, chat_body, gateway_config

GOOD = "pr-good-key-0123456789"
OTHER = "pr-other-key-0123456789"


def _auth() -> dict[str, object]:
    return {
        "enabled": True,
        "keys": [
            {"tenant": "team-a", "sha256": hash_key(GOOD)},
            {"tenant": "team-b", "sha256": hash_key(OTHER), "models": ["some-other-model"]},
        ],
    }


async def test_keys_are_required_and_checked(
    sims: SimFactory,
    gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    workers = await sims(1)
    url = await gateway(gateway_config([w.url for w in workers], auth=_auth()))
    for path, body in (
        ("/v1/chat/completions", chat_body()),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2}),
        ("/generate", {"model": MODEL, "prompt": "hi", "max_tokens": 2}),
        ("/chat", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
    ):
        async with http.post(url + path, json=body) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["code"] == "invalid_api_key"
        wrong = {"Authorization": "Bearer " + GOOD[:-1]}  # a prefix of a real key
        async with http.post(url + path, json=body, headers=wrong) as resp:
            assert resp.status == 401
        async with http.post(url + path, json=body, headers={"x-api-key": GOOD}) as resp:
            assert resp.status == 200
        ok = {"Authorization": f"Bearer {GOOD}"}
        async with http.post(url + path, json=body, headers=ok) as resp:
            assert resp.status == 200
        forbidden = {"Authorization": f"Bearer {OTHER}"}
        async with http.post(url + path, json=body, headers=forbidden) as resp:
            assert resp.status == 403
            error = (await resp.json())["error"]
            assert error["param"] == "model"
    # Health and metrics stay open; keys never reach logs or metrics.
    async with http.get(url + "/metrics") as resp:
        metrics = await resp.text()
    for secret in (GOOD, OTHER, GOOD[:-1]):
        assert secret not in metrics
        assert secret not in caplog.text


def test_keys_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "new"]) == 0
    out = capsys.readouterr().out.splitlines()
    key = out[0].split()[-1]
    digest = out[1].split()[-1]
    assert digest == hash_key(key) and len(digest) == 64
    assert main(["keys", "hash", key]) == 0
    assert capsys.readouterr().out.strip() == digest


ADMIN = "pr-admin-key-0123456789"


def _two_pools(sim_url: str, **extra: object) -> GatewayConfig:
    from router.config import parse_config

    keys = [
        {"tenant": "team-a", "sha256": hash_key(GOOD), "models": [MODEL]},
        {"tenant": "ops", "sha256": hash_key(ADMIN), "admin": True},
    ]
    return parse_config(
        {
            "listen": {"host": "127.0.0.1", "port": 0},
            "auth": {"enabled": True, "keys": keys},
            "pools": {
                MODEL: {"workers": [{"url": sim_url}]},
                "secret-model": {"workers": [{"url": sim_url}]},
            },
            **extra,
        }
    )


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_model_listings_need_a_key_and_show_only_what_it_may_use(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    (sim,) = await sims(1)
    url = await gateway(_two_pools(sim.url))
    for path in ("/v1/models", "/models"):
        async with http.get(url + path) as r:
            assert r.status == 401
    async with http.get(url + "/v1/models", headers=_bearer(GOOD)) as r:
        assert [m["id"] for m in (await r.json())["data"]] == [MODEL]
    async with http.get(url + "/models", headers=_bearer(GOOD)) as r:
        listing = await r.json()
    assert [m["name"] for m in listing["models"]] == [MODEL] and listing["default_model"] == MODEL
    async with http.get(url + "/v1/models", headers=_bearer(ADMIN)) as r:
        assert {m["id"] for m in (await r.json())["data"]} == {MODEL, "secret-model"}
    body = chat_body(model="no-such-model")
    async with http.post(url + "/v1/chat/completions", json=body, headers=_bearer(GOOD)) as r:
        message = (await r.json())["error"]["message"]
    assert r.status == 404 and MODEL in message and "secret-model" not in message


async def test_stats_need_an_admin_key_and_metrics_follow_metrics_public(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    (sim,) = await sims(1)
    open_metrics = await gateway(_two_pools(sim.url))
    async with http.get(open_metrics + "/metrics") as r:
        assert r.status == 200  # the default: Prometheus scrapes without a key
    for headers, status in (({}, 401), (_bearer(GOOD), 403), (_bearer(ADMIN), 200)):
        async with http.get(open_metrics + "/stats", headers=headers) as r:
            assert r.status == status
    closed = await gateway(_two_pools(sim.url, metrics={"public": False}))
    for headers, status in (({}, 401), (_bearer(GOOD), 403), (_bearer(ADMIN), 200)):
        async with http.get(closed + "/metrics", headers=headers) as r:
            assert r.status == status


@pytest.mark.parametrize("tenant_labels", [False, True])
async def test_tenant_names_are_metric_labels_only_when_allowed(
    tenant_labels: bool, sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    (sim,) = await sims(1)
    auth = {
        "enabled": True,
        "keys": [
            {"tenant": "acme-corp", "sha256": hash_key(GOOD), "limits": {"requests_per_minute": 1}}
        ],
    }
    config = gateway_config([sim.url], auth=auth, metrics={"tenant_labels": tenant_labels})
    url = await gateway(config)
    for _ in range(2):
        async with http.post(url + "/v1/chat/completions", json=chat_body(), headers=_bearer(GOOD)):
            pass
    async with http.get(url + "/metrics") as r:
        text = await r.text()
    assert ('tenant="acme-corp"' in text) is tenant_labels
    assert "prefix_router_rate_limited_total{" in text
