"""LoRA-aware routing with real gateways and real simulated workers: an adapter's requests go
only to workers that list it in `/v1/models` (discovered, no YAML entry), the gateway lists the
adapters, the prefix index keys them apart from the base model, and with `dynamic_lora` the
gateway loads an adapter no worker lists onto one worker, once."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from tests.conftest import MODEL, GatewayFactory, SimFactory, gateway_config

PROMPT = " ".join(f"word{i}" for i in range(300))


async def complete(
    http: aiohttp.ClientSession, url: str, model: str, prompt: str = PROMPT
) -> tuple[int, dict[str, Any], dict[str, str]]:
    body = {"model": model, "prompt": prompt, "max_tokens": 2}
    async with http.post(url + "/v1/completions", json=body) as resp:
        return resp.status, await resp.json(), dict(resp.headers)


async def test_adapter_requests_go_only_to_workers_that_list_it(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    (sql,) = await sims(1, lora_modules={"sql-lora": "/adapters/sql"})
    (chat,) = await sims(1, lora_modules={"chat-lora": "/adapters/chat"})
    config = gateway_config([sql.url, chat.url], debug_headers=True)
    url = await gateway(config)
    for model, worker in (("sql-lora", f"{MODEL}/0"), ("chat-lora", f"{MODEL}/1")):
        for i in range(6):
            status, answer, headers = await complete(http, url, model, f"{PROMPT} {i}")
            assert status == 200, answer
            assert answer["model"] == model and headers["X-Route-Worker"] == worker
    async with http.get(url + "/v1/models") as resp:
        cards = {c["id"]: c["parent"] for c in (await resp.json())["data"]}
    assert cards == {MODEL: None, "sql-lora": MODEL, "chat-lora": MODEL}
    status, answer, _ = await complete(http, url, "no-such-lora")
    assert status == 404 and answer["error"]["param"] == "model"


async def test_the_index_keys_an_adapter_apart_from_the_base_model(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    (worker,) = await sims(1, lora_modules={"sql-lora": "/adapters/sql"})
    url = await gateway(gateway_config([worker.url], debug_headers=True))
    await complete(http, url, "sql-lora")
    _, answer, headers = await complete(http, url, "sql-lora")
    assert int(headers["X-Route-Matched-Tokens"]) > 200
    assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] > 200
    _, answer, headers = await complete(http, url, MODEL)  # same text, other cache
    assert int(headers["X-Route-Matched-Tokens"]) == 0
    assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


async def test_dynamic_lora_loads_an_adapter_once(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    workers = await sims(2, runtime_lora_updating=True)
    pool = {"dynamic_lora": True, "lora_adapters": {"new-lora": "/adapters/new"}}
    url = await gateway(gateway_config([w.url for w in workers], pool=pool))
    answers = await asyncio.gather(*(complete(http, url, "new-lora") for _ in range(8)))
    assert all(status == 200 for status, _, _ in answers), answers
    listed = []
    for worker in workers:
        async with http.get(worker.url + "/v1/models") as resp:
            listed.append("new-lora" in {c["id"] for c in (await resp.json())["data"]})
    assert sorted(listed) == [False, True]  # one worker loaded it, for all eight requests

    async with http.get(url + "/metrics") as resp:
        metrics = await resp.text()
    assert 'prefix_router_lora_loads_total{outcome="loaded",pool="test-llm"} 1.0' in metrics


async def test_without_dynamic_lora_an_unlisted_adapter_is_unavailable(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    workers = await sims(1, runtime_lora_updating=True)
    pool = {"lora_adapters": {"new-lora": "/adapters/new"}}
    url = await gateway(gateway_config([w.url for w in workers], pool=pool))
    status, answer, headers = await complete(http, url, "new-lora")
    assert status == 503 and "new-lora" in answer["error"]["message"]
    assert "Retry-After" in headers
