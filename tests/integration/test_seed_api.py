"""The seed API against simulated workers: `/generate`, `/chat` (plain and streamed), `/models`,
`/health` and `/stats` in the shapes of `reference/seed-api.md`."""

from __future__ import annotations

import json
import re
from typing import Any

import aiohttp

from tests.conftest import MODEL, GatewayFactory, SimFactory, gateway_config


async def _seed_events(resp: aiohttp.ClientResponse) -> list[dict[str, Any]]:
    raw = (await resp.read()).decode()
    assert "[DONE]" not in raw  # the seed API ends with its own final event
    events = []
    for block in raw.split("\n\n"):
        block = block.strip()
        if block:
            assert block.startswith("data: ")
            events.append(json.loads(block[len("data: ") :]))
    return events


def _check_stream(events: list[dict[str, Any]], request_id: str, max_tokens: int) -> None:
    *pieces, final = events
    assert final["final"] is True and final["text"] == ""
    assert final["request_id"] == request_id
    assert final["finish_reason"] == "length"
    assert final["tokens_generated"] == max_tokens
    assert pieces
    assert [p["tokens_generated"] for p in pieces] == list(range(1, len(pieces) + 1))
    assert all(set(p) == {"text", "request_id", "tokens_generated"} for p in pieces)
    assert all(p["request_id"] == request_id for p in pieces)
    assert "".join(p["text"] for p in pieces).strip()


async def test_generate_plain_and_streamed(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    workers = await sims(2)
    url = await gateway(gateway_config([w.url for w in workers]))
    body = {
        "prompt": "Explain machine learning",
        "max_tokens": 8,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 50,
        "repetition_penalty": 1.1,
        "stop_sequences": ["\n\n\n"],
        "metadata": {"user_id": "u1", "session_id": "s1"},
    }
    async with http.post(url + "/generate", json=body, headers={"X-Request-Id": "seed-1"}) as r:
        assert r.status == 200
        assert r.headers["X-Request-Id"] == "seed-1"
        answer = await r.json()
    assert answer["text"]
    assert answer["request_id"] == "seed-1"
    assert answer["tokens_generated"] == 8
    assert answer["generation_time"] > 0 and answer["tokens_per_second"] > 0
    assert answer["finish_reason"] == "length"
    assert answer["metadata"] == {"model_name": MODEL, "backend": "vllm"}

    async with http.post(url + "/generate", json={**body, "stream": True}) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        request_id = r.headers["X-Request-Id"]
        events = await _seed_events(r)
    _check_stream(events, request_id, 8)


async def test_chat_plain_and_streamed(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    workers = await sims(1)
    url = await gateway(gateway_config([w.url for w in workers]))
    body = {"messages": [{"role": "user", "content": "capital of France?"}], "max_tokens": 6}
    async with http.post(url + "/chat", json=body) as r:
        assert r.status == 200
        answer = await r.json()
        assert answer["request_id"] == r.headers["X-Request-Id"]
    assert answer["message"]["role"] == "assistant" and answer["message"]["content"]
    assert answer["tokens_generated"] == 6
    assert answer["finish_reason"] == "length"
    assert {"generation_time", "tokens_per_second", "metadata"} <= set(answer)

    async with http.post(url + "/chat", json={**body, "stream": True, "model": MODEL}) as r:
        assert r.status == 200
        events = await _seed_events(r)
        _check_stream(events, r.headers["X-Request-Id"], 6)


async def test_session_metadata_keeps_a_conversation_on_one_worker(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    workers = await sims(3)
    config = gateway_config(
        [w.url for w in workers], debug_headers=True, pool={"policy": {"name": "consistent_hash"}}
    )
    url = await gateway(config)
    chosen = set()
    for i in range(8):
        body = {"prompt": f"{i} distinct opening words", "metadata": {"session_id": "conv-7"}}
        async with http.post(url + "/generate", json=body) as r:
            assert r.status == 200
            chosen.add(r.headers["X-Route-Worker"])
    assert len(chosen) == 1


async def test_seed_errors_are_openai_shaped(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    workers = await sims(1)
    url = await gateway(gateway_config([w.url for w in workers]))
    cases = [
        ("/generate", {"max_tokens": 4}, 400, "prompt"),
        ("/generate", {"prompt": "x", "stop_sequences": "no"}, 400, "stop_sequences"),
        ("/generate", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
        ("/generate", {"prompt": "x", "model": "nope"}, 404, "model"),
        ("/chat", {"messages": "hi"}, 400, "messages"),
    ]
    for path, body, status, param in cases:
        async with http.post(url + path, json=body) as r:
            assert r.status == status, (path, body)
            error = (await r.json())["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["param"] == param


async def test_models_health_and_stats(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    workers = await sims(2)
    config = gateway_config(
        [w.url for w in workers], pool={"aliases": ["short"], "cost_per_gpu_hour": 2.5}
    )
    url = await gateway(config)
    async with http.get(url + "/models") as r:
        models = await r.json()
    assert models["default_model"] == MODEL
    (entry,) = models["models"]
    assert entry["name"] == MODEL and entry["loaded"] is True and entry["backend"] == "vllm"
    assert {"type", "parameters", "context_length"} <= set(entry)

    async with http.get(url + "/health") as r:
        health = await r.json()
    assert health["status"] == "healthy"
    assert health["is_ready"] is True and health["is_loaded"] is True
    assert health["backend_type"] == "vllm"

    for i in range(4):
        body = {"prompt": f"shared system prompt, then question {i}", "max_tokens": 5}
        async with http.post(url + "/generate", json={**body, "stream": i % 2 == 1}) as r:
            assert r.status == 200
            await r.read()
    async with http.post(url + "/generate", json={"prompt": "x", "model": "nope"}) as r:
        assert r.status == 404

    async with http.get(url + "/stats") as r:
        assert r.status == 200
        stats = await r.json()
    assert stats["is_loaded"] is True and stats["is_ready"] is True
    assert stats["backend_type"] == "vllm"
    assert stats["request_count"] == 5
    assert stats["total_tokens_generated"] == 20
    assert stats["total_inference_time"] > 0
    assert stats["avg_tokens_per_request"] == 4.0
    assert stats["avg_time_per_request"] > 0 and stats["avg_tokens_per_second"] > 0
    assert re.fullmatch(r"\d+ days, \d+ hours, \d+ minutes", stats["uptime"])
    pool = stats["pools"][MODEL]
    assert pool["requests"] == 4 and pool["workers"] == 2
    assert pool["completion_tokens"] == 20 and pool["prompt_tokens"] > 0
    assert pool["avg_ttft_s"] > 0 and pool["prefill_saved_s"] >= 0
    assert pool["cost_per_million_tokens"] > 0
    assert set(stats["workers"]) == {f"{MODEL}/0", f"{MODEL}/1"}
    per_worker = stats["workers"].values()
    assert sum(w["requests"] for w in per_worker) == 4
    assert all(w["pool"] == MODEL for w in per_worker)
