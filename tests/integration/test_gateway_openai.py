"""The gateway in front of real simulated workers: OpenAI endpoints, streaming, errors."""

from __future__ import annotations

import json

import aiohttp

from tests.conftest import MODEL, GatewayFactory, SimFactory, chat_body, gateway_config, wait_for
from tests.sse import read_events


async def test_chat_non_streaming_returns_worker_answer(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    workers = await sims(2)
    url = await gateway(gateway_config([w.url for w in workers]))
    async with http.post(url + "/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 200
        assert resp.headers["X-Request-Id"]
        payload = await resp.json()
    assert payload["object"] == "chat.completion"
    assert payload["choices"][0]["message"]["content"]
    assert payload["usage"]["completion_tokens"] == 8
    assert "cached_tokens" in payload["usage"]["prompt_tokens_details"]


async def test_chat_stream_relays_chunks_and_done(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    workers = await sims(2)
    url = await gateway(gateway_config([w.url for w in workers]))
    async with http.post(url + "/v1/chat/completions", json=chat_body(stream=True)) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events, done = await read_events(resp)
    assert done
    content = [e["choices"][0]["delta"].get("content") for e in events if e["choices"]]
    assert sum(1 for c in content if c) == 8
    # The gateway asked upstream for usage but the client did not: no usage chunk reaches it.
    assert all(e.get("choices") != [] for e in events)


async def test_stream_usage_chunk_kept_when_client_asks(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    workers = await sims(1)
    url = await gateway(gateway_config([w.url for w in workers]))
    body = chat_body(stream=True, stream_options={"include_usage": True})
    async with http.post(url + "/v1/chat/completions", json=body) as resp:
        events, done = await read_events(resp)
    assert done
    usage_events = [e for e in events if e.get("choices") == []]
    assert len(usage_events) == 1
    assert usage_events[0]["usage"]["completion_tokens"] == 8


async def test_completions_stream_and_not(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    workers = await sims(2)
    url = await gateway(gateway_config([w.url for w in workers]))
    body = {"model": MODEL, "prompt": "once upon a time", "max_tokens": 5}
    async with http.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200
        payload = await resp.json()
    assert payload["object"] == "text_completion"
    assert payload["usage"]["completion_tokens"] == 5
    async with http.post(url + "/v1/completions", json={**body, "stream": True}) as resp:
        events, done = await read_events(resp)
    assert done
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]).strip()


async def test_alias_and_unknown_fields_pass_through(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    workers = await sims(1)
    config = gateway_config([w.url for w in workers], pool={"aliases": ["short-name"]})
    url = await gateway(config)
    body = chat_body(model="short-name", some_future_field={"x": 1}, top_k=5)
    async with http.post(url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        assert (await resp.json())["model"] == MODEL


async def test_models_health_ready_metrics(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    workers = await sims(1)
    url = await gateway(gateway_config([w.url for w in workers], pool={"aliases": ["alias"]}))
    async with http.get(url + "/v1/models") as resp:
        ids = {m["id"] for m in (await resp.json())["data"]}
    assert ids == {MODEL, "alias"}
    async with http.get(url + "/health") as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "healthy"
    async with http.get(url + "/ready") as resp:
        assert resp.status == 200
    async with http.post(url + "/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 200
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
    assert 'prefix_router_requests_total{model="test-llm",policy=' in text
    assert "prefix_router_worker_in_flight" in text


async def test_ready_fails_without_healthy_worker(
    gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    url = await gateway(gateway_config(["http://127.0.0.1:9"]))
    async with http.get(url + "/ready") as resp:
        assert resp.status == 503
    async with http.get(url + "/health") as resp:
        assert resp.status == 200  # liveness is not readiness


async def test_request_id_is_echoed_and_generated(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    workers = await sims(1)
    url = await gateway(gateway_config([w.url for w in workers]))
    headers = {"X-Request-Id": "my-trace-123"}
    async with http.post(url + "/v1/chat/completions", json=chat_body(), headers=headers) as r:
        assert r.headers["X-Request-Id"] == "my-trace-123"
    async with http.post(url + "/v1/chat/completions", json=chat_body()) as r:
        assert len(r.headers["X-Request-Id"]) == 32


async def test_in_flight_returns_to_zero(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    workers = await sims(2)
    url = await gateway(gateway_config([w.url for w in workers]))
    for i in range(6):
        async with http.post(
            url + "/v1/chat/completions", json=chat_body(f"q {i}", stream=i % 2 == 0)
        ) as r:
            await r.read()

    async def all_idle() -> bool:
        async with http.get(url + "/metrics") as resp:
            text = await resp.text()
        lines = [ln for ln in text.splitlines() if ln.startswith("prefix_router_worker_in_flight{")]
        return len(lines) == 2 and all(ln.endswith(" 0.0") for ln in lines)

    await wait_for(all_idle, what="in-flight gauges back to zero")


def _error_of(payload: dict[str, object]) -> dict[str, object]:
    error = payload["error"]
    assert isinstance(error, dict)
    assert set(error) == {"message", "type", "param", "code"}
    return error


async def test_bad_input_gets_openai_errors(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    workers = await sims(1)
    config = gateway_config([w.url for w in workers], limits={"max_body_bytes": 2048})
    url = await gateway(config)
    chat = url + "/v1/chat/completions"

    async with http.post(
        chat, data=b"{not json", headers={"Content-Type": "application/json"}
    ) as r:
        assert r.status == 400
        _error_of(await r.json())
    async with http.post(chat, json={"messages": [{"role": "user", "content": "x"}]}) as r:
        assert r.status == 400
        assert _error_of(await r.json())["param"] == "model"
    async with http.post(chat, json=chat_body(model="no-such-model")) as r:
        assert r.status == 404
        error = _error_of(await r.json())
        assert error["param"] == "model" and error["code"] == "model_not_found"
    async with http.post(chat, json=chat_body("x" * 5000)) as r:
        assert r.status == 413
        _error_of(await r.json())
    async with http.get(chat) as r:
        assert r.status == 405
        _error_of(await r.json())
    async with http.get(url + "/nope") as r:
        assert r.status == 404
        _error_of(await r.json())
    async with http.post(chat, json=chat_body(max_tokens="many")) as r:
        assert r.status == 400
        assert _error_of(await r.json())["param"] == "max_tokens"
    async with http.post(chat, json={"model": MODEL, "messages": "hi"}) as r:
        assert r.status == 400
        assert _error_of(await r.json())["param"] == "messages"
    nested: object = "x"
    for _ in range(100):
        nested = [nested]
    async with http.post(chat, data=json.dumps({"model": MODEL, "messages": nested})) as r:
        assert r.status == 400  # small, but nested past limits.max_json_depth (32)
        assert "nests deeper than 32 levels" in str(_error_of(await r.json())["message"])


async def test_unreachable_upstream_is_503_with_retry_after(
    gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    url = await gateway(gateway_config(["http://127.0.0.1:9"]))
    async with http.post(url + "/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 503
        assert int(resp.headers["Retry-After"]) >= 1
        _error_of(await resp.json())


async def test_stream_options_null_still_gets_usage_upstream(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    workers = await sims(1)
    url = await gateway(gateway_config([w.url for w in workers]))
    body = chat_body(stream=True, stream_options=None)
    async with http.post(url + "/v1/chat/completions", json=body) as resp:
        events, done = await read_events(resp)
    assert done and all(e.get("choices") != [] for e in events)  # not shown to the client...
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
    completion = [
        ln for ln in text.splitlines() if ln.startswith("prefix_router_completion_tokens_total{")
    ]
    assert completion and float(completion[0].rsplit(" ", 1)[1]) == 8  # ...but counted
