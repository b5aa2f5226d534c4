"""The simulated vLLM worker over real HTTP: API shapes, SSE, caching, metrics, errors, aborts."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from tests.conftest import wait_for
from tests.integration.conftest import SIM_MODEL as MODEL
from workers.sim.config import SimConfig
from workers.sim.runner import SimHandle, start_sim_worker

LONG_TEXT = " ".join(f"word{i}" for i in range(200))


async def read_sse(resp: aiohttp.ClientResponse) -> list[str]:
    body = (await resp.read()).decode()
    assert body.endswith("\n\n")
    events = body.split("\n\n")[:-1]
    assert all(e.startswith("data: ") for e in events)
    return [e[len("data: ") :] for e in events]


async def counters(session: aiohttp.ClientSession, sim: SimHandle) -> dict[str, Any]:
    async with session.get(sim.url + "/sim/counters") as resp:
        assert resp.status == 200
        data: dict[str, Any] = await resp.json()
        return data


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], **extra}


async def test_chat_stream_shape(sim: SimHandle, session: aiohttp.ClientSession) -> None:
    body = chat_body(stream=True, max_tokens=5)
    async with session.post(sim.url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = await read_sse(resp)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) == 6  # role + 5 tokens, no usage chunk without include_usage
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    deltas = [c["choices"][0]["delta"]["content"] for c in chunks[1:]]
    assert all(d.startswith(" ") and len(d.split()) == 1 for d in deltas)
    finish = [c["choices"][0]["finish_reason"] for c in chunks]
    assert finish == [None] * 5 + ["length"]
    assert all("usage" not in c for c in chunks)


async def test_chat_stream_usage_only_with_include_usage(
    sim: SimHandle, session: aiohttp.ClientSession
) -> None:
    body = chat_body(stream=True, max_completion_tokens=3, stream_options={"include_usage": True})
    async with session.post(sim.url + "/v1/chat/completions", json=body) as resp:
        events = await read_sse(resp)
    assert events[-1] == "[DONE]"
    usage_chunk = json.loads(events[-2])
    assert usage_chunk["choices"] == []
    usage = usage_chunk["usage"]
    assert usage["completion_tokens"] == 3
    assert usage["total_tokens"] == usage["prompt_tokens"] + 3
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}


async def test_completion_stream_and_default_max_tokens(
    sim: SimHandle, session: aiohttp.ClientSession
) -> None:
    body = {"model": MODEL, "prompt": "once upon a time", "stream": True}
    async with session.post(sim.url + "/v1/completions", json=body) as resp:
        assert resp.status == 200
        events = await read_sse(resp)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) == 16  # default max_tokens
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert len(text.split()) == 16


async def test_non_stream_responses(sim: SimHandle, session: aiohttp.ClientSession) -> None:
    async with session.post(
        sim.url + "/v1/chat/completions", json=chat_body(max_tokens=4, unknown_field=1)
    ) as resp:
        assert resp.status == 200
        chat = await resp.json()
    assert chat["object"] == "chat.completion" and chat["model"] == MODEL
    choice = chat["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    assert len(choice["message"]["content"].split()) == 4
    assert chat["usage"]["completion_tokens"] == 4
    assert chat["usage"]["prompt_tokens_details"]["cached_tokens"] == 0

    body = {"prompt": [1, 2, 3], "max_tokens": 2}  # token ids, model omitted: both allowed
    async with session.post(sim.url + "/v1/completions", json=body) as resp:
        assert resp.status == 200
        completion = await resp.json()
    assert completion["object"] == "text_completion"
    assert completion["usage"]["prompt_tokens"] == 3
    assert len(completion["choices"][0]["text"].split()) == 2


async def test_repeated_long_prompt_hits_the_cache(
    sim: SimHandle, session: aiohttp.ClientSession
) -> None:
    body = {"model": MODEL, "prompt": LONG_TEXT, "max_tokens": 2}
    for expected in (0, (200 - 1) // 16 * 16):
        async with session.post(sim.url + "/v1/completions", json=body) as resp:
            usage = (await resp.json())["usage"]
        assert usage["prompt_tokens"] == 200
        assert usage["prompt_tokens_details"]["cached_tokens"] == expected
    # Streamed, with a salt: a different cache namespace, then a hit within it.
    salted = {**body, "stream": True, "stream_options": {"include_usage": True}, "cache_salt": "t"}
    for expected in (0, 192):
        async with session.post(sim.url + "/v1/completions", json=salted) as resp:
            events = await read_sse(resp)
        assert json.loads(events[-2])["usage"]["prompt_tokens_details"]["cached_tokens"] == expected
    stats = await counters(session, sim)
    assert stats["requests"] == 4 and stats["prompt_tokens"] == 800
    assert stats["cached_tokens"] == 384 and stats["generation_tokens"] == 8


async def test_multi_turn_chat_hits_previous_turn(
    sim: SimHandle, session: aiohttp.ClientSession
) -> None:
    messages: list[dict[str, str]] = [{"role": "user", "content": LONG_TEXT}]
    prompt_tokens = 0
    for turn in range(3):
        body = {"model": MODEL, "messages": messages, "max_tokens": 20}
        async with session.post(sim.url + "/v1/chat/completions", json=body) as resp:
            data = await resp.json()
        usage = data["usage"]
        if turn:
            # Previous prompt and most of its answer were cached (output blocks too).
            assert usage["prompt_tokens_details"]["cached_tokens"] >= prompt_tokens // 16 * 16
        prompt_tokens = usage["prompt_tokens"]
        answer = data["choices"][0]["message"]["content"]
        messages = [*messages, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": f"and then {turn}?"})


async def test_metrics_names_and_labels(sim: SimHandle, session: aiohttp.ClientSession) -> None:
    async with session.post(sim.url + "/v1/chat/completions", json=chat_body(max_tokens=2)) as r:
        assert r.status == 200
    async with session.get(sim.url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    labels = f'{{engine="0",model_name="{MODEL}"}}'
    for series in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_count",
        "vllm:e2e_request_latency_seconds_count",
    ):
        assert f"{series}{labels}" in text, series
    assert (
        f'vllm:request_success_total{{engine="0",finished_reason="length",model_name="{MODEL}"}}'
        " 1.0" in text
    )
    assert (
        'vllm:cache_config_info{block_size="16",enable_prefix_caching="True",engine="0",'
        f'model_name="{MODEL}",num_gpu_blocks="2048",prefix_caching_hash_algo="sha256"}} 1.0'
    ) in text
    assert 'vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001"' in text
    assert 'le="2560.0"' in text


async def test_counters_and_reset(sim: SimHandle, session: aiohttp.ClientSession) -> None:
    body = {"model": MODEL, "prompt": LONG_TEXT, "max_tokens": 3}
    for _ in range(2):
        async with session.post(sim.url + "/v1/completions", json=body) as resp:
            assert resp.status == 200
    stats = await counters(session, sim)
    assert stats["requests"] == 2 and stats["cached_tokens"] == 192
    assert stats["generation_tokens"] == 6 and stats["aborted"] == 0
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert stats["cached_blocks"] > 0 and stats["free_blocks"] == 2048
    async with session.post(sim.url + "/sim/reset") as resp:
        assert resp.status == 200
    stats = await counters(session, sim)
    assert stats["requests"] == 0 and stats["cached_tokens"] == 0 and stats["cached_blocks"] == 0
    async with session.post(sim.url + "/v1/completions", json=body) as resp:
        assert (await resp.json())["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


async def test_models_and_health(sim: SimHandle, session: aiohttp.ClientSession) -> None:
    async with session.get(sim.url + "/health") as resp:
        assert resp.status == 200 and await resp.read() == b""
    async with session.get(sim.url + "/v1/models") as resp:
        models = await resp.json()
    assert models["object"] == "list"
    (card,) = models["data"]
    assert card["id"] == MODEL and card["object"] == "model" and card["owned_by"] == "vllm"
    assert card["root"] == MODEL and card["parent"] is None and card["max_model_len"] == 32768
    assert card["permission"][0]["object"] == "model_permission"


@pytest.mark.parametrize(
    ("path", "payload", "status", "error_type", "param"),
    [
        ("/v1/chat/completions", b"{not json", 400, "BadRequestError", None),
        ("/v1/completions", b"[1, 2]", 400, "BadRequestError", None),
        ("/v1/chat/completions", {"model": "other", "messages": []}, 404, "NotFoundError", "model"),
        ("/v1/completions", {"model": "other", "prompt": "x"}, 404, "NotFoundError", "model"),
        ("/v1/chat/completions", {"messages": "nope"}, 400, "BadRequestError", "messages"),
        ("/v1/completions", {"prompt": "x " * 40000}, 400, "BadRequestError", None),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "BadRequestError", "max_tokens"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 40000}, 400, "BadRequestError", None),
    ],
)
async def test_error_shapes(
    sim: SimHandle,
    session: aiohttp.ClientSession,
    path: str,
    payload: bytes | dict[str, Any],
    status: int,
    error_type: str,
    param: str | None,
) -> None:
    kwargs: dict[str, Any] = {"data": payload} if isinstance(payload, bytes) else {"json": payload}
    async with session.post(sim.url + path, **kwargs) as resp:
        assert resp.status == status
        body = await resp.json()
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and error["type"] == error_type and error["param"] == param
    assert isinstance(error["message"], str) and error["message"]


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_aborts_request(
    session: aiohttp.ClientSession, stream: bool
) -> None:
    # Real time here (1 ms steps) so the request is still running when the client leaves.
    config = SimConfig(model=MODEL, port=0, step_overhead_s=0.001, time_scale=1.0)
    sim = await start_sim_worker(config)
    try:
        body = {"model": MODEL, "prompt": LONG_TEXT, "max_tokens": 5000, "stream": stream}
        if stream:
            resp = await session.post(sim.url + "/v1/completions", json=body)
            assert resp.status == 200
            first = await resp.content.readuntil(b"\n\n")
            assert first.startswith(b"data: ")
            assert (await counters(session, sim))["running"] == 1
            resp.close()  # drop the connection mid-stream
        else:
            pending = asyncio.ensure_future(session.post(sim.url + "/v1/completions", json=body))

            async def running() -> bool:
                return bool((await counters(session, sim))["running"] == 1)

            await wait_for(running)
            pending.cancel()  # the client gives up before the response
            with pytest.raises(asyncio.CancelledError):
                await pending

        async def aborted() -> bool:
            stats = await counters(session, sim)
            return bool(stats["running"] == 0 and stats["aborted"] == 1)

        await wait_for(aborted)
        stats = await counters(session, sim)
        assert stats["free_blocks"] == stats["num_gpu_blocks"]
        # The prompt's blocks survived the abort as cached, evictable blocks.
        body = {"model": MODEL, "prompt": LONG_TEXT, "max_tokens": 1}
        async with session.post(sim.url + "/v1/completions", json=body) as again:
            assert (await again.json())["usage"]["prompt_tokens_details"]["cached_tokens"] == 192
    finally:
        await sim.stop()


async def test_concurrent_streams_all_complete(
    sim: SimHandle, session: aiohttp.ClientSession
) -> None:
    async def one(i: int) -> list[str]:
        body = {"prompt": f"{LONG_TEXT} {i}", "max_tokens": 8, "stream": True}
        async with session.post(sim.url + "/v1/completions", json=body) as resp:
            return await read_sse(resp)

    results = await asyncio.gather(*(one(i) for i in range(40)))
    assert all(r[-1] == "[DONE]" and len(r) == 9 for r in results)
    stats = await counters(session, sim)
    assert stats["requests"] == 40 and stats["running"] == 0
    # Requests admitted in the same step all miss, as in vLLM (no one has computed the prefix
    # yet); whatever hits there were are whole blocks, and a later request hits the shared part.
    assert stats["cached_tokens"] % 16 == 0
    body = {"prompt": f"{LONG_TEXT} x", "max_tokens": 1}
    async with session.post(sim.url + "/v1/completions", json=body) as resp:
        assert (await resp.json())["usage"]["prompt_tokens_details"]["cached_tokens"] == 192
