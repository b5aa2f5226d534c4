"""`cache_salt` partitions the prefix cache, in the gateway's index as on the workers: equal
prompts under different salts are no hit, and a tenant configured with a salt shares its cache
with nobody, whatever salt its clients send (real gateway, real simulated worker)."""

from __future__ import annotations

import random
from typing import Any

import aiohttp

from router.auth import hash_key
from tests.conftest import MODEL, GatewayFactory, SimFactory, gateway_config, matched_and_cached

ISOLATED_KEY, OTHER_KEY = "pr-isolated-tenant-key", "pr-other-tenant-key"
ISOLATED_SALT = "isolated-tenant-secret-salt-0123456789"


def prompt(seed: int) -> str:
    rng = random.Random(seed)
    return " ".join("".join(rng.choices("abcdefgh", k=3)) for _ in range(400))


async def complete(
    http: aiohttp.ClientSession, url: str, text: str, key: str | None = None, **extra: Any
) -> tuple[int, int]:
    """(tokens the gateway predicted cached, tokens the worker reported cached)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": MODEL, "prompt": text, "max_tokens": 1, **extra}
    return await matched_and_cached(http, url, body, headers)


async def test_a_different_salt_is_no_prefix_hit(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    (worker,) = await sims(1)
    url = await gateway(gateway_config([worker.url], debug_headers=True))
    text = prompt(1)
    await complete(http, url, text, cache_salt="salt-a")
    predicted, reported = await complete(http, url, text, cache_salt="salt-a")
    assert reported > 300 and predicted > 300  # same salt: a hit, known to the gateway
    predicted, reported = await complete(http, url, text, cache_salt="salt-b")
    assert (predicted, reported) == (0, 0)  # the worker holds nothing for this salt
    predicted, reported = await complete(http, url, text)
    assert (predicted, reported) == (0, 0)  # nor without one


async def test_a_tenant_salt_isolates_its_cache(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    (worker,) = await sims(1)
    auth = {
        "enabled": True,
        "keys": [
            {
                "tenant": "isolated",
                "sha256": hash_key(ISOLATED_KEY),
                "cache_salt": ISOLATED_SALT,
            },
            {"tenant": "other", "sha256": hash_key(OTHER_KEY)},
        ],
    }
    url = await gateway(gateway_config([worker.url], debug_headers=True, auth=auth))
    text = prompt(2)
    await complete(http, url, text, ISOLATED_KEY)
    assert (await complete(http, url, text, ISOLATED_KEY))[1] > 300
    # Another tenant with the same prompt reaches none of it (the salt is a secret: vLLM's
    # isolation rests on nobody else knowing it, so it is never logged or sent to clients).
    assert await complete(http, url, text, OTHER_KEY) == (0, 0)
    # The isolated tenant's clients may partition further within their own cache.
    assert await complete(http, url, text, ISOLATED_KEY, cache_salt="mine") == (0, 0)


async def test_a_salt_that_is_not_a_string_is_refused(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    (worker,) = await sims(1)
    url = await gateway(gateway_config([worker.url]))
    for salt in ("", 7, ["x"]):
        body = {"model": MODEL, "prompt": "hi", "cache_salt": salt}
        async with http.post(url + "/v1/completions", json=body) as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
            assert error["param"] == "cache_salt" and error["type"] == "invalid_request_error"
