"""API keys: 401 without or with a wrong key, 403 for a model the key may not use."""

from __future__ import annotations

import logging

import aiohttp
import pytest

from router.auth import hash_key
from router.cli import main
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
