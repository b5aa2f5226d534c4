"""Reliability with real simulated workers and scripted faults: cancellation, mid-stream
failure, retries to another worker, ejection of a hung worker and its return."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from tests.conftest import GatewayFactory, SimFactory, chat_body, gateway_config, wait_for
from tests.sse import read_events
from workers.sim.runner import SimHandle


async def _faults(http: aiohttp.ClientSession, sim: SimHandle, *faults: dict[str, Any]) -> None:
    async with http.post(sim.url + "/sim/faults", json={"faults": list(faults)}) as resp:
        assert resp.status == 200, await resp.text()


async def _counters(http: aiohttp.ClientSession, sim: SimHandle) -> dict[str, Any]:
    async with http.get(sim.url + "/sim/counters") as resp:
        counters: dict[str, Any] = await resp.json()
        return counters


async def _metric(http: aiohttp.ClientSession, url: str, prefix: str) -> float:
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(prefix))


async def test_client_hangup_cancels_the_upstream_sequence(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    (sim,) = await sims(1, time_scale=1.0)
    url = await gateway(gateway_config([sim.url]))
    body = chat_body("a long answer " * 50, stream=True, max_tokens=2000)
    async with aiohttp.ClientSession() as client:
        resp = await client.post(url + "/v1/chat/completions", json=body)
        assert (await resp.content.readany()).startswith(b"data: ")
        assert (await _counters(http, sim))["running"] == 1
        resp.close()  # the client hangs up mid-stream

    async def freed() -> bool:
        c = await _counters(http, sim)
        return bool(
            c["running"] == 0 and c["aborted"] == 1 and c["free_blocks"] == c["num_gpu_blocks"]
        )

    await wait_for(freed, what="the worker aborted the sequence and freed its blocks")
    assert (await _counters(http, sim))["generation_tokens"] < 2000


async def test_worker_dying_mid_stream_ends_with_an_error_event(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    (sim,) = await sims(1)
    url = await gateway(gateway_config([sim.url]))
    await _faults(http, sim, {"kind": "die_mid_stream", "after_tokens": 3, "count": 1})
    async with http.post(url + "/v1/chat/completions", json=chat_body(stream=True)) as resp:
        assert resp.status == 200
        events, done = await read_events(resp)
    assert not done, "a broken stream must never look finished"
    assert sum(1 for e in events if e.get("choices")) >= 1
    error = events[-1]["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "upstream_stream_broken"
    assert await _metric(http, url, "prefix_router_stream_errors_total") == 1
    async with http.post(url + "/v1/chat/completions", json=chat_body(stream=True)) as resp:
        assert (await read_events(resp))[1]  # the next one is whole again


async def test_failures_before_the_first_byte_are_retried_elsewhere(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    bad, good = await sims(2)
    config = gateway_config(
        [bad.url, good.url, "http://127.0.0.1:9"],
        pool={"policy": {"name": "round_robin"}},
        outlier={"consecutive_failures": 1000},
        health={"interval_s": 60},
    )
    url = await gateway(config)
    await wait_for(lambda: _healthy(http, url, 2), what="both live workers healthy")
    await _faults(http, bad, {"kind": "status", "status": 503})
    for i in range(12):
        stream = i % 2 == 0
        async with http.post(
            url + "/v1/chat/completions", json=chat_body(f"q{i}", stream=stream)
        ) as resp:
            assert resp.status == 200
            if stream:
                assert (await read_events(resp))[1]
            else:
                await resp.read()
    assert (await _counters(http, bad))["faults_injected"] >= 1
    assert await _metric(http, url, "prefix_router_retries_total") >= 1
    assert (await _counters(http, good))["requests"] == 12


async def test_hung_worker_is_ejected_then_readmitted(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    hung, good = await sims(2)
    config = gateway_config(
        [hung.url, good.url],
        pool={"policy": {"name": "round_robin"}},
        timeouts={"first_byte_s": 0.3, "generation_s": 0.3},
        retries={"retry_on_first_byte_timeout": True},
        outlier={"consecutive_failures": 2, "base_ejection_s": 0.5},
    )
    url = await gateway(config)
    await _faults(http, hung, {"kind": "hang_before_first_byte"})
    for i in range(6):
        async with http.post(url + "/v1/chat/completions", json=chat_body(f"h{i}")) as resp:
            assert resp.status == 200  # retried on the good worker after the first-byte timeout
    assert await _metric(http, url, "prefix_router_worker_ejections_total") >= 1
    async with http.delete(hung.url + "/sim/faults") as resp:
        assert resp.status == 200
    before = (await _counters(http, hung))["finished"]

    async def serving_again() -> bool:
        async with http.post(url + "/v1/chat/completions", json=chat_body("again")) as resp:
            assert resp.status == 200
        return bool((await _counters(http, hung))["finished"] > before)

    await wait_for(serving_again, what="the recovered worker gets traffic again")


async def _healthy(http: aiohttp.ClientSession, url: str, n: int) -> bool:
    return await _metric(http, url, "prefix_router_worker_healthy{") >= n


async def test_a_stall_longer_than_the_idle_timeout_ends_the_stream_with_an_error(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    (sim,) = await sims(1)
    url = await gateway(gateway_config([sim.url], timeouts={"idle_s": 0.3}))
    await _faults(
        http, sim, {"kind": "stall_between_tokens", "after_tokens": 2, "stall_s": 30, "count": 1}
    )
    async with http.post(url + "/v1/chat/completions", json=chat_body(stream=True)) as resp:
        events, done = await read_events(resp)
    assert not done
    assert events[-1]["error"]["code"] == "upstream_stream_broken"
    assert "idle_timeout" in events[-1]["error"]["message"]


async def test_overloaded_pool_caps_max_tokens(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    (sim,) = await sims(1, time_scale=1.0)
    pool = {"admission": {"max_in_flight_per_worker": 1}, "overload_max_tokens": 4}
    url = await gateway(gateway_config([sim.url], pool=pool))
    chat = url + "/v1/chat/completions"
    blocker = asyncio.create_task(http.post(chat, json=chat_body("hold", max_tokens=100)))
    await wait_for(lambda: _running_is(http, sim, 1), what="the pool is saturated")
    async with http.post(chat, json=chat_body("under overload", max_tokens=50)) as resp:
        assert resp.status == 200
        assert (await resp.json())["usage"]["completion_tokens"] == 4
    first = await blocker
    assert (await first.json())["usage"]["completion_tokens"] == 100  # admitted before overload


async def _running_is(http: aiohttp.ClientSession, sim: SimHandle, n: int) -> bool:
    return bool((await _counters(http, sim))["running"] == n)


async def test_in_flight_and_backlog_return_to_zero_after_every_kind_of_ending(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    flaky, steady = await sims(2, time_scale=0.2)
    config = gateway_config(
        [flaky.url, steady.url, "http://127.0.0.1:9"],
        outlier={"consecutive_failures": 1000},
        health={"interval_s": 60},
    )
    url = await gateway(config)
    await _faults(
        http,
        flaky,
        {"kind": "status", "status": 503, "count": 3},
        {"kind": "die_mid_stream", "after_tokens": 2, "count": 3},
    )
    chat = url + "/v1/chat/completions"

    async def finish(i: int) -> None:
        async with http.post(chat, json=chat_body(f"mix {i}", stream=i % 2 == 0)) as resp:
            await resp.read()

    async def hang_up(i: int) -> None:
        async with aiohttp.ClientSession() as client:
            resp = await client.post(chat, json=chat_body(f"gone {i}", stream=True, max_tokens=500))
            await resp.content.readany()
            resp.close()

    await asyncio.gather(*(finish(i) for i in range(16)), *(hang_up(i) for i in range(4)))

    async def idle() -> bool:
        in_flight = await _metric(http, url, "prefix_router_worker_in_flight{")
        backlog = await _metric(http, url, "prefix_router_worker_prefill_backlog_tokens{")
        return in_flight == 0 and backlog == 0

    await wait_for(idle, what="in-flight counts and prefill backlogs back to zero")
    assert (await _counters(http, flaky))["faults_injected"] == 6
    assert await _metric(http, url, "prefix_router_upstream_failures_total") >= 6
