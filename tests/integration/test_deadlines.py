"""Deadlines with real simulated workers made slow by scripted faults: a non-streamed answer has
its own generation deadline (vLLM sends no header until it is complete), a request a worker
accepted is not sent to a second GPU on a first-byte timeout unless the config says so, and the
total deadline ends a started stream with one error event."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from tests.conftest import GatewayFactory, SimFactory, chat_body, gateway_config
from workers.sim.runner import SimHandle


async def _faults(http: aiohttp.ClientSession, sim: SimHandle, *faults: dict[str, Any]) -> None:
    async with http.post(sim.url + "/sim/faults", json={"faults": list(faults)}) as resp:
        assert resp.status == 200, await resp.text()


async def _requests_seen(http: aiohttp.ClientSession, sims: list[SimHandle]) -> int:
    total = 0
    for sim in sims:
        async with http.get(sim.url + "/sim/counters") as resp:
            total += int((await resp.json())["requests"])
    return total


async def _two_faulty_workers(
    sims: SimFactory,
    gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    fault: dict[str, Any],
    timeouts: dict[str, float],
) -> tuple[list[SimHandle], str]:
    """Two workers running `fault`, behind a round-robin gateway with these timeouts."""
    workers = await sims(2)
    for sim in workers:
        await _faults(http, sim, fault)
    config = gateway_config(
        [w.url for w in workers], pool={"policy": {"name": "round_robin"}}, timeouts=timeouts
    )
    return workers, await gateway(config)


async def test_a_long_non_streamed_answer_outlives_first_byte_s(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    # The answer is complete only after a 0.5 s stall: ten times the first-byte timeout.
    stall = {"kind": "stall_between_tokens", "after_tokens": 1, "stall_s": 0.5}
    workers, url = await _two_faulty_workers(sims, gateway, http, stall, {"first_byte_s": 0.05})
    async with http.post(url + "/v1/chat/completions", json=chat_body(max_tokens=4)) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["usage"]["completion_tokens"] == 4
    assert await _requests_seen(http, workers) == 1


async def test_the_generation_deadline_cuts_a_non_streamed_answer_without_a_retry(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    workers, url = await _two_faulty_workers(
        sims,
        gateway,
        http,
        {"kind": "hang_before_first_byte"},
        {"first_byte_s": 0.05, "generation_s": 0.3},
    )
    async with http.post(url + "/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 504, await resp.text()
        assert (await resp.json())["error"]["code"] == "upstream_timeout"
    assert await _requests_seen(http, workers) == 1  # one GPU did the work, not three


async def test_an_accepted_stream_is_not_retried_on_a_first_byte_timeout_by_default(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    workers, url = await _two_faulty_workers(
        sims, gateway, http, {"kind": "hang_before_first_byte"}, {"first_byte_s": 0.2}
    )
    body = chat_body(stream=True)
    async with http.post(url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 504, await resp.text()
    assert await _requests_seen(http, workers) == 1


async def test_first_byte_timeouts_are_retried_when_the_config_asks(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    hung, good = await sims(2)
    await _faults(http, hung, {"kind": "hang_before_first_byte"})
    config = gateway_config(
        [hung.url, good.url],
        pool={"policy": {"name": "round_robin"}},
        timeouts={"first_byte_s": 0.2, "generation_s": 0.2},
        retries={"retry_on_first_byte_timeout": True},
        outlier={"consecutive_failures": 1000},
    )
    url = await gateway(config)

    async def injected() -> int:
        async with http.get(hung.url + "/sim/counters") as resp:
            return int((await resp.json())["faults_injected"])

    for stream in (False, True):
        hits = 0
        for i in range(6):  # round robin: some of these meet the hung worker first
            before = await injected()
            body = chat_body(f"r{i}", stream=stream)
            async with http.post(url + "/v1/chat/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()
            hits += await injected() - before
        assert hits >= 1, f"no {'streamed' if stream else 'non-streamed'} request met the hang"


async def _raw_post(url: str, path: str, body: dict[str, Any]) -> bytes:
    """The gateway's bytes exactly as sent, up to the connection's end: a second status line
    written into a prepared response would show here, where an HTTP client may hide it."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
            + payload
        )
        async with asyncio.timeout(30):  # a hang fails the test
            return await reader.read()
    finally:
        writer.close()


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)  # anything but a chunk size here is broken framing
        if size == 0:
            assert body == b"\r\n", body[:200]
            return bytes(out)
        out += body[:size]
        assert body[size : size + 2] == b"\r\n"
        body = body[size + 2 :]


async def test_the_total_deadline_ends_a_started_stream_with_one_error_event(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    (sim,) = await sims(1)
    # Two tokens, then a stall far past the total deadline (and inside the idle timeout).
    await _faults(
        http, sim, {"kind": "stall_between_tokens", "after_tokens": 2, "stall_s": 60, "count": 1}
    )
    url = await gateway(gateway_config([sim.url], timeouts={"total_s": 0.5, "idle_s": 120}))
    raw = await _raw_post(url, "/v1/chat/completions", chat_body(stream=True, max_tokens=8))
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert b"transfer-encoding: chunked" in head.lower()
    events = [e for e in _dechunk(body).split(b"\n\n") if e]
    assert all(e.startswith(b"data: ") for e in events), events
    assert b"data: [DONE]" not in events
    errors = [json.loads(e[6:])["error"] for e in events if b'"error"' in e]
    assert len(errors) == 1 and events[-1].startswith(b'data: {"error"'), events
    assert set(errors[0]) == {"message", "type", "param", "code"}
    assert errors[0]["code"] == "timeout"
    assert any(b'"choices"' in e for e in events[:-1])  # the tokens before the stall arrived
    async with http.post(url + "/v1/chat/completions", json=chat_body(stream=True)) as resp:
        assert resp.status == 200  # the gateway serves on
        assert (await resp.read()).rstrip().endswith(b"data: [DONE]")
