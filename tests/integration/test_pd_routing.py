"""P/D pools with a real gateway in front of real simulated prefill and decode workers: the
prefill step's body as vLLM needs it, the decode step relaying the answer streamed or not with
the prefill's cached tokens, the same request id on both legs, and each failure case (a prefill
retried elsewhere, every prefill failing, a prefill without params, a decode failure restarting
with a new prefill). One scripted prefill worker (an aiohttp app that records what it got)
stands in where a test needs to see the prefill body."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from router.upstream.disaggregation import REMOTE_DECODE
from tests.conftest import MODEL, GatewayFactory, SimFactory, gateway_config
from tests.raw_server import MODELS
from workers.sim.fault_spec import parse_fault_spec

PROMPT = " ".join(f"tok{i}" for i in range(400))


def pd_config(prefill: list[str], decode: list[str], **overrides: Any) -> Any:
    workers = [{"url": u, "role": "prefill"} for u in prefill]
    workers += [{"url": u, "role": "decode"} for u in decode]
    pool = {"workers": workers, **overrides.pop("pool", {})}
    return gateway_config([], pool=pool, debug_headers=True, **overrides)


async def steps(http: aiohttp.ClientSession, url: str) -> dict[tuple[str, str], float]:
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
    out = {}
    for line in text.splitlines():
        if line.startswith("prefix_router_pd_steps_total{"):
            labels = dict(
                p.split("=") for p in line[line.index("{") + 1 : line.index("}")].split(",")
            )
            out[(labels["step"].strip('"'), labels["outcome"].strip('"'))] = float(line.split()[-1])
    return out


async def counters(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url + "/sim/counters") as resp:
        return await resp.json()


async def stream_chat(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None, **extra: Any
) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 20,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }
    chunks = []
    async with http.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if line.startswith(b"data: {"):
                chunks.append(json.loads(line[6:]))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    usage = next(c["usage"] for c in chunks if c.get("usage"))
    return text, usage, chunks


async def complete(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 16}
    async with http.post(url + "/v1/completions", json=body) as resp:
        return resp.status, await resp.json()


async def test_a_request_runs_prefill_then_decode(
    sims: SimFactory,
    gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="prefix_router.access")
    prefills = await sims(2, role="prefill")
    decodes = await sims(2, role="decode")
    (plain,) = await sims(1)
    url = await gateway(pd_config([p.url for p in prefills], [d.url for d in decodes]))
    _, expected = await complete(http, plain.url)
    status, first = await complete(http, url)
    assert status == 200, first
    assert first["choices"][0]["text"] == expected["choices"][0]["text"]
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # the prefill's: cold
    status, second = await complete(http, url)
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert 0 < cached < second["usage"]["prompt_tokens"]  # the prefill's hit, not the decode's
    # Each request ran once on a prefill worker and once on a decode worker, which got the KV.
    p = [await counters(http, w.url) for w in prefills]
    d = [await counters(http, w.url) for w in decodes]
    assert sum(c["requests"] for c in p) == 2 and sum(c["requests"] for c in d) == 2
    assert sum(c["cached_tokens"] for c in d) == 2 * second["usage"]["prompt_tokens"]
    assert [c["kv_leases"] for c in p] == [0, 0]  # every lease was pulled
    # The prefill pick is prefix-aware: the repeat found its prompt's worker.
    assert sorted(c["requests"] for c in p) == [0, 2]
    text, usage, _ = await stream_chat(http, url)
    assert len(text.split()) == 20 and usage["completion_tokens"] == 20
    assert (await steps(http, url))[("decode", "ok")] == 3
    records = [vars(r) for r in caplog.records if r.name == "prefix_router.access"]
    first, repeat, _ = (r["prefill_worker"] for r in records)
    assert first == repeat and {r["prefill_worker"] for r in records} <= {
        f"{MODEL}/0",
        f"{MODEL}/1",
    }
    assert {r["worker"] for r in records} <= {f"{MODEL}/2", f"{MODEL}/3"}


@pytest.fixture
async def scripted_prefill() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A prefill worker that records each request and answers without transfer params (as a
    prefill that finished early does)."""
    seen: list[dict[str, Any]] = []

    async def completions(request: web.Request) -> web.Response:
        seen.append({"body": await request.json(), "rid": request.headers.get("X-Request-Id")})
        answer = {
            "id": "cmpl-x",
            "object": "chat.completion",
            "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}}],
            "usage": {"prompt_tokens": 400, "completion_tokens": 1, "total_tokens": 401},
        }
        return web.json_response(answer)

    async def health(_: web.Request) -> web.Response:
        return web.Response()

    async def models(_: web.Request) -> web.Response:
        return web.Response(body=MODELS, content_type="application/json")

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


async def test_the_prefill_body_and_a_prefill_without_params(
    scripted_prefill: tuple[str, list[dict[str, Any]]],
    sims: SimFactory,
    gateway: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    prefill_url, seen = scripted_prefill
    (decode,) = await sims(1, role="decode")
    (plain,) = await sims(1)
    url = await gateway(pd_config([prefill_url], [decode.url]))
    text, usage, chunks = await stream_chat(
        http, url, headers={"X-Request-Id": "pd-request-1"}, min_tokens=5
    )
    (got,) = seen
    body = got["body"]
    assert got["rid"] == "pd-request-1"  # the same id on both legs
    # NixlConnector's request for a remote decode (the reference proxies send the same).
    assert body["kv_transfer_params"] == REMOTE_DECODE
    assert REMOTE_DECODE["do_remote_decode"] is True and REMOTE_DECODE["do_remote_prefill"] is False
    assert body["stream"] is False and "stream_options" not in body
    assert body["max_tokens"] == 1 and body["min_tokens"] == 1
    assert body["messages"] == [{"role": "user", "content": PROMPT}]
    # No params came back: the decode worker prefilled itself and answered in full.
    assert chunks[0]["id"] == "chatcmpl-pd-request-1"
    expected, _, _ = await stream_chat(http, plain.url, min_tokens=5)
    assert text == expected and usage["prompt_tokens_details"]["cached_tokens"] == 0
    assert (await counters(http, decode.url))["cached_tokens"] == 0  # nothing transferred
    assert (await steps(http, url))[("prefill", "no_params")] == 1


async def test_a_failed_prefill_is_retried_on_another_prefill_worker(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    failing = await sims(1, role="prefill", faults=(parse_fault_spec("status:status=503"),))
    healthy = await sims(1, role="prefill")
    (decode,) = await sims(1, role="decode")
    url = await gateway(pd_config([failing[0].url, healthy[0].url], [decode.url]))
    for _ in range(4):
        status, answer = await complete(http, url)
        assert status == 200, answer
    assert (await counters(http, healthy[0].url))["requests"] == 4
    assert (await counters(http, decode.url))["cached_tokens"] > 0  # the KV came along
    assert ("prefill", "failed") not in await steps(http, url)


async def test_when_every_prefill_fails_the_decode_worker_serves_alone(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    failing = await sims(2, role="prefill", faults=(parse_fault_spec("status:status=503"),))
    (decode,) = await sims(1, role="decode")
    url = await gateway(pd_config([f.url for f in failing], [decode.url]))
    status, answer = await complete(http, url)
    assert status == 200 and answer["usage"]["completion_tokens"] == 16
    assert (await steps(http, url))[("prefill", "failed")] == 1


async def test_a_decode_failure_it_saw_restarts_with_a_new_prefill(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    (prefill,) = await sims(1, role="prefill")
    fault = parse_fault_spec("status:status=500,count=1")
    (decode,) = await sims(1, role="decode", faults=(fault,))
    url = await gateway(pd_config([prefill.url], [decode.url]))
    status, answer = await complete(http, url)
    assert status == 200, answer
    assert (await counters(http, prefill.url))["requests"] == 2  # a second prefill
    counted = await steps(http, url)
    assert counted[("decode", "restarted")] == 1 and counted[("decode", "ok")] == 1


async def test_a_decode_worker_holding_the_prompt_serves_it_alone(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    (prefill,) = await sims(1, role="prefill")
    (decode,) = await sims(1, role="decode")
    config = pd_config([prefill.url], [decode.url], pool={"pd_min_uncached_tokens": 64})
    url = await gateway(config)
    await complete(http, url)  # prefill, then decode: the decode worker now holds the prompt
    await complete(http, url)
    assert (await counters(http, prefill.url))["requests"] == 1
    assert (await steps(http, url))[("decode", "alone")] == 1


async def test_a_stream_whose_decode_worker_dies_continues_as_a_new_pd_request(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    (prefill,) = await sims(1, role="prefill")
    dying = await sims(
        1, role="decode", faults=(parse_fault_spec("die_mid_stream:after_tokens=3"),)
    )
    healthy = await sims(1, role="decode")
    (plain,) = await sims(1)
    url = await gateway(pd_config([prefill.url], [dying[0].url, healthy[0].url]))
    expected, _, _ = await stream_chat(http, plain.url)
    sent = broke = 0
    while not broke:  # ties in the decode pick go at random: until one met the dying worker
        assert sent < 30, "the dying decode worker was never picked"
        text, usage, _ = await stream_chat(http, url)
        sent += 1
        assert text == expected and usage["completion_tokens"] == 20
        broke = (await counters(http, dying[0].url))["faults_injected"]
    # Each break's continuation ran its own prefill step: one per request, one per break.
    assert (await counters(http, prefill.url))["requests"] == sent + broke
