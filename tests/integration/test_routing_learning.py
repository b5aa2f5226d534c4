"""The gateway learns from what real simulated workers answer: characters per token per pool,
and the answer's text in the index (the next turn matches its whole history)."""

from __future__ import annotations

import json
import random
from typing import Any

import aiohttp

from router.config import parse_config
from tests.conftest import GatewayFactory, SimFactory, matched_and_cached

SHORT, LONG = "short-words", "long-words"


def words(rng: random.Random, n: int, letters: int) -> str:
    return " ".join("".join(rng.choices("abcdefghij", k=letters)) for _ in range(n))


def two_pool_config(short_url: str, long_url: str) -> Any:
    return parse_config(
        {
            "listen": {"host": "127.0.0.1", "port": 0},
            "auth": {"enabled": False},
            "debug_headers": True,
            "health": {"interval_s": 0.2, "timeout_s": 1.0},
            "pools": {
                SHORT: {"workers": [{"url": short_url}]},
                LONG: {"workers": [{"url": long_url}]},
            },
        }
    )


async def complete(
    http: aiohttp.ClientSession, url: str, model: str, prompt: str
) -> tuple[int, int]:
    """(tokens the gateway predicted cached, tokens the worker reported cached)."""
    body = {"model": model, "prompt": prompt, "max_tokens": 1}
    return await matched_and_cached(http, url, body)


async def test_each_pool_learns_its_own_characters_per_token(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    (short,) = await sims(1, model=SHORT)
    (long,) = await sims(1, model=LONG)
    url = await gateway(two_pool_config(short.url, long.url))
    rng = random.Random(11)
    for model, letters in ((SHORT, 3), (LONG, 11)):  # 4 and 12 characters per token
        for _ in range(30):  # distinct prompts: the calibration, not the cache, is learned
            await complete(http, url, model, words(rng, 300, letters))
        prompt = words(rng, 600, letters)
        await complete(http, url, model, prompt)
        predicted, reported = await complete(http, url, model, prompt)
        # 600 tokens, cached but the last (partial) block: the index's estimate must agree.
        assert reported >= 560
        assert abs(predicted - reported) <= 0.15 * reported, (model, predicted, reported)


async def test_next_turn_matches_the_answer_as_cached(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    from tests.conftest import MODEL, gateway_config

    handles = await sims(2)
    url = await gateway(gateway_config([h.url for h in handles], debug_headers=True))
    rng = random.Random(12)
    messages = [{"role": "user", "content": words(rng, 200, 3)}]
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": 400,
        "stream": True,
    }
    answer = []
    async with http.post(url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        async for line in resp.content:
            if line.startswith(b"data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    answer.append(choice["delta"].get("content") or "")
    text = "".join(answer)
    assert len(text.split()) >= 300
    turn2 = [*messages, {"role": "assistant", "content": text}, {"role": "user", "content": "ok"}]
    body = {"model": MODEL, "messages": turn2, "max_tokens": 1}
    async with http.post(url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        predicted = int(resp.headers["X-Route-Matched-Tokens"])
        reported = (await resp.json())["usage"]["prompt_tokens_details"]["cached_tokens"]
    # The worker cached the answer's blocks too; the index must know it (not just 200 tokens).
    assert reported >= 450
    assert predicted >= 0.8 * reported, (predicted, reported)


async def test_hidden_kv_capacity_leaves_the_cache_config_metric_out(
    sims: SimFactory, http: aiohttp.ClientSession
) -> None:
    shown, hidden = await sims(1), await sims(1, export_kv_capacity=False)
    for handle, present in ((shown[0], True), (hidden[0], False)):
        async with http.get(handle.url + "/metrics") as resp:
            assert ("vllm:cache_config_info" in await resp.text()) is present


async def test_a_prompt_the_worker_refused_is_not_indexed(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    """A prompt over the worker's max_model_len is refused (400, passed on to the client) and
    was never computed: the index must not list it, or it would push out what the worker
    holds and promise a cache hit for the next prompt that shares it."""
    from tests.conftest import MODEL, gateway_config

    (handle,) = await sims(1, max_model_len=1000)
    url = await gateway(gateway_config([handle.url], debug_headers=True))
    rng = random.Random(13)
    refused = words(rng, 1200, 3)
    body = {"model": MODEL, "prompt": refused, "max_tokens": 1}
    async with http.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 400, await resp.text()
    # A prompt within the limit that shares the refused one's first 600 words.
    shared = " ".join(refused.split()[:600])
    predicted, reported = await complete(http, url, MODEL, shared)
    assert reported == 0
    assert predicted == 0
