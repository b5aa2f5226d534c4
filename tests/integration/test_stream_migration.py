"""Streams that survive a dying worker: real gateway, real simulated workers that die on cue.

The simulated worker's answer is a function of the prompt (and of the tokens so far), so the
uninterrupted answer is known: a migrated stream must equal it, token for token, with one role
chunk, one id, one `[DONE]`, and usage for the whole answer.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadtest.procs import Fleet, start_sim, wait_ready
from tests.conftest import MODEL, GatewayFactory, SimFactory, gateway_config, wait_for
from tests.sse import read_events

MESSAGES = [{"role": "user", "content": "tell me everything about the rivers of the north"}]
ROUND_ROBIN = {"policy": {"name": "round_robin"}}  # the first request goes to the first worker


def _chat(max_tokens: int = 12, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }


async def _die(http: aiohttp.ClientSession, url: str, after: int, count: int = 1) -> None:
    fault = {"kind": "die_mid_stream", "after_tokens": after, "count": count}
    async with http.post(url + "/sim/faults", json=fault) as resp:
        assert resp.status == 200


async def _reference(http: aiohttp.ClientSession, sim_url: str, body: dict[str, Any]) -> Any:
    """The uninterrupted answer, straight from a worker."""
    async with http.post(sim_url + "/v1/chat/completions", json=body) as resp:
        return await read_events(resp)


def _text(events: list[Any]) -> str:
    return "".join(
        e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices")
    )


async def _migrations(http: aiohttp.ClientSession, url: str) -> dict[tuple[str, str], float]:
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
    return {
        (s.labels["cause"], s.labels["outcome"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "prefix_router_stream_migrations_total"
    }


async def test_a_worker_dying_mid_stream_is_invisible_to_the_client(
    sims: SimFactory,
    gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="prefix_router.access")
    dying, healthy = await sims(2)
    reference, done = await _reference(http, healthy.url, _chat())
    assert done
    url = await gateway(gateway_config([dying.url, healthy.url], pool=ROUND_ROBIN))
    await _die(http, dying.url, after=3)
    async with http.post(url + "/v1/chat/completions", json=_chat()) as resp:
        assert resp.status == 200
        events, done = await read_events(resp)
    assert done and not any("error" in e for e in events)
    assert _text(events) == _text(reference)
    roles = [e for e in events if e.get("choices") and "role" in e["choices"][0]["delta"]]
    assert len(roles) == 1
    assert len({e["id"] for e in events}) == 1  # the continuation reads as the same stream
    assert {e["model"] for e in events} == {MODEL}
    usage = events[-1]["usage"]
    assert usage["prompt_tokens"] == reference[-1]["usage"]["prompt_tokens"]
    assert usage["completion_tokens"] == 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + 12
    assert await _migrations(http, url) == {("stream_broken", "migrated"): 1.0}
    (record,) = [vars(r) for r in caplog.records if r.name == "prefix_router.access"]
    assert record["segments"] == [f"{MODEL}/0", f"{MODEL}/1"] and record["status"] == 200


async def test_usage_is_left_out_when_the_client_did_not_ask_and_completions_migrate_too(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    dying, healthy = await sims(2)
    body = {"model": MODEL, "prompt": "once upon a time", "max_tokens": 10, "stream": True}
    async with http.post(healthy.url + "/v1/completions", json=body) as resp:
        reference, _ = await read_events(resp)
    url = await gateway(gateway_config([dying.url, healthy.url], pool=ROUND_ROBIN))
    await _die(http, dying.url, after=4)
    async with http.post(url + "/v1/completions", json=body) as resp:
        events, done = await read_events(resp)
    assert done and not any("usage" in e and e["usage"] for e in events)
    text = "".join(e["choices"][0]["text"] for e in events if e.get("choices"))
    assert text == "".join(e["choices"][0]["text"] for e in reference if e.get("choices"))


async def test_a_stream_that_keeps_breaking_ends_with_the_error_event_after_the_bound(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    workers = await sims(4)
    for sim in workers:
        await _die(http, sim.url, after=2, count=5)
    url = await gateway(gateway_config([w.url for w in workers], pool=ROUND_ROBIN))
    async with http.post(url + "/v1/chat/completions", json=_chat(max_tokens=30)) as resp:
        events, done = await read_events(resp)
    assert not done
    assert events[-1]["error"]["code"] == "upstream_stream_broken"
    assert len(_text(events).split()) == 2 * 3  # three segments of two tokens each
    assert await _migrations(http, url) == {
        ("stream_broken", "migrated"): 2.0,
        ("stream_broken", "limit"): 1.0,
    }


async def test_a_continuation_whose_worker_stays_silent_is_retried_on_another(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    # First-byte timeouts are not retried by default (a slow answer must not cost two GPUs),
    # but a continuation's client already holds half an answer: a silent worker there is
    # given up and the next one asked.
    dying, silent, healthy = await sims(3)
    reference, _ = await _reference(http, healthy.url, _chat())
    # Round robin: the request takes the first worker, its continuation the second of the
    # two left (the silent one), the retry the healthy one.
    config = gateway_config(
        [dying.url, healthy.url, silent.url], pool=ROUND_ROBIN, timeouts={"first_byte_s": 0.5}
    )
    assert not config.retries.retry_on_first_byte_timeout
    url = await gateway(config)
    await _die(http, dying.url, after=3)
    fault = {"kind": "hang_before_first_byte", "count": 1}
    async with http.post(silent.url + "/sim/faults", json=fault) as resp:
        assert resp.status == 200
    async with http.post(url + "/v1/chat/completions", json=_chat()) as resp:
        events, done = await read_events(resp)
    assert done and not any("error" in e for e in events)
    assert _text(events) == _text(reference)
    assert await _migrations(http, url) == {("stream_broken", "migrated"): 1.0}
    async with http.get(silent.url + "/sim/counters") as resp:
        assert int((await resp.json())["aborted"]) == 1  # the silent worker was asked, and let go


async def test_a_request_that_cannot_be_continued_faithfully_ends_with_the_error_event(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    dying, healthy = await sims(2)
    url = await gateway(gateway_config([dying.url, healthy.url], pool=ROUND_ROBIN))
    await _die(http, dying.url, after=3)
    async with http.post(url + "/v1/chat/completions", json=_chat(logprobs=True)) as resp:
        events, done = await read_events(resp)
    assert not done and events[-1]["error"]["code"] == "upstream_stream_broken"
    assert await _migrations(http, url) == {("stream_broken", "logprobs"): 1.0}


async def test_migration_is_off_with_migrations_zero(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    dying, healthy = await sims(2)
    pool = {**ROUND_ROBIN, "migrations": 0}
    url = await gateway(gateway_config([dying.url, healthy.url], pool=pool))
    await _die(http, dying.url, after=3)
    async with http.post(url + "/v1/chat/completions", json=_chat()) as resp:
        events, done = await read_events(resp)
    assert not done and json.dumps(events[-1]).count("upstream_stream_broken") == 1


async def test_the_seed_apis_streams_migrate_too(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    dying, healthy = await sims(2)
    url = await gateway(gateway_config([dying.url, healthy.url], pool=ROUND_ROBIN))
    body = {"prompt": "once upon a time", "max_tokens": 10, "stream": True}
    async with http.post(url + "/generate", json=body) as resp:
        whole = await resp.read()  # the pool's first worker is still healthy here
    await _die(http, dying.url, after=4)
    async with http.post(url + "/generate", json=body) as resp:
        await resp.read()  # round robin: the healthy worker's turn
    async with http.post(url + "/generate", json=body) as resp:
        migrated = await resp.read()  # ...and the dying worker's again
    assert b"error" not in migrated
    assert migrated.count(b"[DONE]") == whole.count(b"[DONE]")

    def pieces(raw: bytes) -> list[str]:
        return [
            json.dumps(json.loads(line[6:]).get("text"))
            for line in raw.split(b"\n\n")
            if line.startswith(b"data: {")
        ]

    assert pieces(migrated) == pieces(whole)
    assert await _migrations(http, url) == {("stream_broken", "migrated"): 1.0}


async def test_a_worker_process_killed_mid_stream_is_invisible_to_the_client(
    gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    # Real processes: SIGKILL leaves no chance to say goodbye (no chunked end, no FIN first).
    fleet = Fleet()
    try:
        procs = [start_sim(MODEL, ["--time-scale", "1.0"]) for _ in range(2)]
        fleet.procs.extend(procs)
        for proc in procs:
            await wait_ready(proc.url, "/health")
        body = _chat(max_tokens=150)
        reference, _ = await _reference(http, procs[1].url, body)
        config = gateway_config([p.url for p in procs], pool=ROUND_ROBIN, debug_headers=True)
        url = await gateway(config)
        async with http.post(url + "/v1/chat/completions", json=body) as resp:
            serving = next(p for p in procs if resp.headers["X-Route-Worker"].endswith("/0"))
            assert serving is procs[0]
            for _ in range(5):
                await resp.content.readuntil(b"\n\n")  # the stream is flowing
            os.kill(serving.pid, signal.SIGKILL)
            rest, done = await read_events(resp)
        assert done and not any("error" in e for e in rest)
        # The events read before the kill were the reference's first ones: compare the rest.
        assert _text(reference).endswith(_text(rest)) and len(_text(rest).split()) > 100
        assert await _migrations(http, url) == {("stream_broken", "migrated"): 1.0}
    finally:
        fleet.stop()


async def test_a_client_that_hangs_up_during_a_migration_cancels_it(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    dying, waiting = await sims(2)
    url = await gateway(gateway_config([dying.url, waiting.url], pool=ROUND_ROBIN))
    await _die(http, dying.url, after=3)
    async with http.post(waiting.url + "/sim/faults", json={"kind": "hang_before_first_byte"}):
        pass  # the continuation will wait for a first byte that never comes
    resp = await http.post(url + "/v1/chat/completions", json=_chat(max_tokens=50))
    await resp.content.readuntil(b"\n\n")

    async def continuation_running() -> bool:
        async with http.get(waiting.url + "/sim/counters") as r:
            return int((await r.json())["running"]) == 1

    await wait_for(continuation_running, what="the continuation sent to the second worker")
    resp.close()  # the client hangs up while the gateway waits for the continuation

    async def aborted() -> bool:
        async with http.get(waiting.url + "/sim/counters") as r:
            counters = await r.json()
        return int(counters["running"]) == 0 and int(counters["aborted"]) == 1

    await wait_for(aborted, what="the continuation cancelled on the second worker")


async def test_the_broken_workers_in_flight_count_ends_when_the_stream_moves_on(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    dying, healthy = await sims(2, time_scale=1.0)
    url = await gateway(gateway_config([dying.url, healthy.url], pool=ROUND_ROBIN))
    await _die(http, dying.url, after=3)
    async with http.post(url + "/v1/chat/completions", json=_chat(max_tokens=200)) as resp:
        for _ in range(10):
            await resp.content.readuntil(b"\n\n")  # past the seam: the continuation streams

        async def in_flight() -> dict[str, float]:
            async with http.get(url + "/metrics") as r:
                text = await r.text()
            return {
                s.labels["worker"]: s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
                if s.name == "prefix_router_worker_in_flight"
            }

        assert await in_flight() == {f"{MODEL}/0": 0.0, f"{MODEL}/1": 1.0}
        await resp.read()
