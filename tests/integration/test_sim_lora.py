"""The simulated worker serves LoRA adapters as vLLM does: listed in `/v1/models` with their
parent, answered under their own name, cached apart from the base model, loaded into
`max_loras` slots at a cost, reported in `vllm:lora_requests_info`, and loaded at run time only
when runtime updating is allowed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from workers.cli import _lora_arg
from workers.sim.config import SimConfig
from workers.sim.runner import SimHandle, start_sim_worker

BASE = "base-model"
PROMPT = " ".join(f"w{i}" for i in range(200))


@pytest.fixture
async def lora_sim() -> AsyncIterator[SimHandle]:
    config = SimConfig(
        model=BASE,
        port=0,
        time_scale=0,
        lora_modules={"sql-lora": "/adapters/sql", "chat-lora": "/adapters/chat"},
        max_loras=1,
        runtime_lora_updating=True,
    )
    handle = await start_sim_worker(config)
    try:
        yield handle
    finally:
        await handle.stop()


async def complete(
    http: aiohttp.ClientSession, url: str, model: str, prompt: str = PROMPT
) -> tuple[int, dict[str, Any]]:
    body = {"model": model, "prompt": prompt, "max_tokens": 2}
    async with http.post(url + "/v1/completions", json=body) as resp:
        return resp.status, await resp.json()


def cached(answer: dict[str, Any]) -> int:
    usage = answer["usage"]
    assert isinstance(usage, dict)
    return int(usage["prompt_tokens_details"]["cached_tokens"])


async def test_adapters_are_listed_with_their_parent(
    lora_sim: SimHandle, session: aiohttp.ClientSession
) -> None:
    async with session.get(lora_sim.url + "/v1/models") as resp:
        cards = (await resp.json())["data"]
    assert [(c["id"], c["parent"], c["root"]) for c in cards] == [
        (BASE, None, BASE),
        ("sql-lora", BASE, "/adapters/sql"),
        ("chat-lora", BASE, "/adapters/chat"),
    ]
    assert cards[1]["max_model_len"] is None


async def test_an_adapter_answers_under_its_name_and_caches_apart(
    lora_sim: SimHandle, session: aiohttp.ClientSession
) -> None:
    status, answer = await complete(session, lora_sim.url, "sql-lora")
    assert status == 200 and answer["model"] == "sql-lora"
    assert cached((await complete(session, lora_sim.url, "sql-lora"))[1]) > 150
    assert cached((await complete(session, lora_sim.url, BASE))[1]) == 0  # other hashes
    assert cached((await complete(session, lora_sim.url, "chat-lora"))[1]) == 0
    status, answer = await complete(session, lora_sim.url, "no-such-lora")
    assert status == 404 and answer["error"]["param"] == "model"


async def test_slots_loads_and_the_requests_info_metric(
    lora_sim: SimHandle, session: aiohttp.ClientSession
) -> None:
    for model in ("sql-lora", "sql-lora", "chat-lora", "sql-lora"):
        assert (await complete(session, lora_sim.url, model, "a b c"))[0] == 200
    async with session.get(lora_sim.url + "/sim/counters") as resp:
        counters = await resp.json()
    # One slot: sql loads, stays for its second request, chat evicts it, sql loads again.
    assert counters["lora_loads"] == 3 and counters["lora_resident"] == ["sql-lora"]
    async with session.get(lora_sim.url + "/metrics") as resp:
        text = await resp.text()
    (family,) = [
        f for f in text_string_to_metric_families(text) if f.name == "vllm:lora_requests_info"
    ]
    newest = max(family.samples, key=lambda s: s.value)
    assert newest.labels == {
        "max_lora": "1",
        "running_lora_adapters": "",
        "waiting_lora_adapters": "",
    }


async def test_runtime_load_and_unload(lora_sim: SimHandle, session: aiohttp.ClientSession) -> None:
    load = {"lora_name": "new-lora", "lora_path": "/adapters/new"}
    async with session.post(lora_sim.url + "/v1/load_lora_adapter", json=load) as resp:
        assert resp.status == 200 and "added successfully" in await resp.text()
    async with session.post(lora_sim.url + "/v1/load_lora_adapter", json=load) as resp:
        assert resp.status == 400  # already loaded
    assert (await complete(session, lora_sim.url, "new-lora"))[0] == 200
    unload = {"lora_name": "new-lora"}
    async with session.post(lora_sim.url + "/v1/unload_lora_adapter", json=unload) as resp:
        assert resp.status == 200
    async with session.post(lora_sim.url + "/v1/unload_lora_adapter", json=unload) as resp:
        assert resp.status == 404
    assert (await complete(session, lora_sim.url, "new-lora"))[0] == 404


async def test_runtime_updates_are_off_by_default(session: aiohttp.ClientSession) -> None:
    handle = await start_sim_worker(SimConfig(model=BASE, port=0, time_scale=0))
    try:
        load = {"lora_name": "x", "lora_path": "/x"}
        async with session.post(handle.url + "/v1/load_lora_adapter", json=load) as resp:
            assert resp.status == 404
        async with session.get(handle.url + "/metrics") as resp:
            assert "vllm:lora_requests_info" not in await resp.text()
    finally:
        await handle.stop()


def test_the_flag_takes_name_equals_path() -> None:
    assert _lora_arg("sql=/a/b=c") == ("sql", "/a/b=c")
    with pytest.raises(Exception, match="NAME=PATH"):
        _lora_arg("no-path")
