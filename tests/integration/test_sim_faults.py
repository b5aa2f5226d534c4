"""Fault injection in the simulated worker, seen by a real aiohttp client over real sockets.

Every fault is scripted with ``count`` (deterministic); the seeded ``probability`` path is checked
for reproducibility only. Where a test must show that nothing arrives (a hang, a stall), it reads
with a short bound and expects nothing: a correct worker never sends, so that check cannot flake,
and no test asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from tests.conftest import wait_for
from tests.integration.conftest import SIM_MODEL as MODEL
from tests.integration.test_sim_worker import counters, read_sse
from workers.sim.config import SimConfig
from workers.sim.fault_spec import parse_fault_spec
from workers.sim.runner import SimHandle, start_sim_worker

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
NOTHING_ARRIVES_S = 0.2  # bound of a read that must come back empty-handed


async def set_faults(
    session: aiohttp.ClientSession, sim: SimHandle, *faults: dict[str, Any], seed: int = 0
) -> dict[str, Any]:
    async with session.post(
        sim.url + "/sim/faults", json={"faults": list(faults), "seed": seed}
    ) as resp:
        assert resp.status == 200, await resp.text()
        view: dict[str, Any] = await resp.json()
        return view


async def clear_faults(session: aiohttp.ClientSession, sim: SimHandle) -> None:
    async with session.delete(sim.url + "/sim/faults") as resp:
        assert resp.status == 200
        assert (await resp.json())["faults"] == []


def completion(max_tokens: int = 4, stream: bool = False) -> dict[str, Any]:
    return {
        "model": MODEL,
        "prompt": "hello there world",
        "max_tokens": max_tokens,
        "stream": stream,
    }


async def assert_serves_normally(session: aiohttp.ClientSession, sim: SimHandle) -> None:
    async with session.post(sim.url + COMPLETIONS, json=completion(stream=True)) as resp:
        assert resp.status == 200
        events = await read_sse(resp)
    assert events[-1] == "[DONE]" and len(events) == 5


async def idle(session: aiohttp.ClientSession, sim: SimHandle, aborted: int | None = None) -> None:
    """Wait until no sequence runs and every KV block is free again (nothing leaked)."""

    async def check() -> bool:
        stats = await counters(session, sim)
        return bool(
            stats["running"] == 0
            and stats["waiting"] == 0
            and stats["free_blocks"] == stats["num_gpu_blocks"]
            and (aborted is None or stats["aborted"] == aborted)
        )

    await wait_for(check)


async def nothing_arrives(resp: aiohttp.ClientResponse) -> bool:
    try:
        data = await asyncio.wait_for(resp.content.read(1), NOTHING_ARRIVES_S)
    except TimeoutError:
        return True
    raise AssertionError(f"expected silence, got {data!r}")


async def sse_events_until_cut(resp: aiohttp.ClientResponse) -> list[str]:
    """Read SSE events until the connection breaks; fail if it ends cleanly."""
    events: list[str] = []
    with pytest.raises(aiohttp.ClientPayloadError):
        async for line in resp.content:
            if line.startswith(b"data: "):
                events.append(line[len(b"data: ") :].decode().strip())
    return events


async def test_refuse_resets_the_connection_then_count_runs_out(
    sim: SimHandle, session: aiohttp.ClientSession
) -> None:
    await set_faults(session, sim, {"kind": "refuse", "count": 2})
    for stream in (False, True):
        with pytest.raises(aiohttp.ClientConnectionError):
            async with session.post(sim.url + COMPLETIONS, json=completion(stream=stream)) as r:
                await r.read()
    async with session.get(sim.url + "/health") as resp:  # scope "inference": health unharmed
        assert resp.status == 200
    await assert_serves_normally(session, sim)  # the count ran out
    stats = await counters(session, sim)
    assert stats["faults_injected"] == 2
    assert stats["requests"] == 1  # refused requests never reached the engine
    async with session.get(sim.url + "/sim/faults") as resp:
        (rule,) = (await resp.json())["faults"]
    assert rule["kind"] == "refuse" and rule["remaining"] == 0 and rule["injected"] == 2


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (500, "InternalServerError"),
        (502, "Bad Gateway"),
        (503, "ServiceUnavailableError"),
        (429, "Too Many Requests"),
    ],
)
async def test_status_answers_a_vllm_error(
    sim: SimHandle, session: aiohttp.ClientSession, status: int, error_type: str
) -> None:
    await set_faults(
        session, sim, {"kind": "status", "status": status, "retry_after_s": 3, "count": 2}
    )
    for path, body in ((COMPLETIONS, completion(stream=True)), (CHAT, {"messages": []})):
        async with session.post(sim.url + path, json=body) as resp:
            assert resp.status == status
            assert resp.headers["Retry-After"] == "3"
            error = (await resp.json())["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == status and error["type"] == error_type
    await assert_serves_normally(session, sim)
    assert (await counters(session, sim))["faults_injected"] == 2


async def test_status_with_scope_all_fails_health_but_never_sim_endpoints(
    sim: SimHandle, session: aiohttp.ClientSession
) -> None:
    await set_faults(session, sim, {"kind": "status", "status": 503, "scope": "all"})
    for path in ("/health", "/v1/models", "/metrics"):
        async with session.get(sim.url + path) as resp:
            assert resp.status == 503, path
    async with session.get(sim.url + "/sim/counters") as resp:
        assert resp.status == 200
    await clear_faults(session, sim)
    async with session.get(sim.url + "/health") as resp:
        assert resp.status == 200
    await assert_serves_normally(session, sim)


async def test_hang_sends_no_body_byte_until_cleared(
    sim: SimHandle, session: aiohttp.ClientSession
) -> None:
    await set_faults(session, sim, {"kind": "hang_before_first_byte", "count": 1})
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    resp = await session.post(sim.url + CHAT, json={**body, "stream": True})
    try:
        assert resp.status == 200  # vLLM sends the headers before its first token
        stats = await counters(session, sim)
        assert stats["running"] == 1  # stuck in the engine, holding its slot
        assert await nothing_arrives(resp)
        await clear_faults(session, sim)
        events = await read_sse(resp)
    finally:
        resp.close()
    assert events[-1] == "[DONE]"
    assert len(events) == 7  # role chunk, 5 tokens, [DONE]: the request resumed intact
    assert json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"
    await idle(session, sim, aborted=0)


async def test_hang_non_streamed_answers_once_cleared(
    sim: SimHandle, session: aiohttp.ClientSession
) -> None:
    await set_faults(session, sim, {"kind": "hang_before_first_byte"})
    pending = asyncio.ensure_future(session.post(sim.url + COMPLETIONS, json=completion(3)))

    async def running() -> bool:
        return bool((await counters(session, sim))["running"] == 1)

    await wait_for(running)
    assert not pending.done()
    await clear_faults(session, sim)
    resp = await pending
    async with resp:
        assert resp.status == 200
        assert (await resp.json())["usage"]["completion_tokens"] == 3
    await idle(session, sim, aborted=0)


@pytest.mark.parametrize("stream", [True, False])
async def test_client_leaving_during_hang_frees_the_sequence(
    sim: SimHandle, session: aiohttp.ClientSession, stream: bool
) -> None:
    await set_faults(session, sim, {"kind": "hang_before_first_byte"})
    pending = asyncio.ensure_future(
        session.post(sim.url + COMPLETIONS, json=completion(50, stream=stream))
    )

    async def running() -> bool:
        return bool((await counters(session, sim))["running"] == 1)

    await wait_for(running)
    if stream:
        (await pending).close()  # headers came; drop the connection
    else:
        pending.cancel()  # the client gives up before any response
        with pytest.raises(asyncio.CancelledError):
            await pending
    await idle(session, sim, aborted=1)


async def test_die_mid_stream_cuts_after_n_tokens(
    sim: SimHandle, session: aiohttp.ClientSession
) -> None:
    await set_faults(session, sim, {"kind": "die_mid_stream", "after_tokens": 3, "count": 1})
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000}
    async with session.post(sim.url + CHAT, json={**body, "stream": True}) as resp:
        assert resp.status == 200
        events = await sse_events_until_cut(resp)
    assert "[DONE]" not in events
    chunks = [json.loads(e) for e in events]
    assert len(chunks) == 4  # the role chunk and exactly 3 tokens
    assert all("error" not in c for c in chunks)
    await idle(session, sim, aborted=1)  # the engine request was aborted, its blocks freed
    await assert_serves_normally(session, sim)


async def test_die_mid_stream_non_streamed_drops_the_connection(
    sim: SimHandle, session: aiohttp.ClientSession
) -> None:
    await set_faults(session, sim, {"kind": "die_mid_stream", "after_tokens": 2, "count": 1})
    with pytest.raises(aiohttp.ClientConnectionError):
        async with session.post(sim.url + COMPLETIONS, json=completion(1000)) as resp:
            await resp.read()
    await idle(session, sim, aborted=1)
    await assert_serves_normally(session, sim)


async def test_die_after_more_tokens_than_the_answer_has_is_harmless(
    sim: SimHandle, session: aiohttp.ClientSession
) -> None:
    await set_faults(session, sim, {"kind": "die_mid_stream", "after_tokens": 4})
    await assert_serves_normally(session, sim)  # 4 tokens asked: the cut never comes


async def test_stall_pauses_after_n_tokens(sim: SimHandle, session: aiohttp.ClientSession) -> None:
    await set_faults(
        session, sim, {"kind": "stall_between_tokens", "after_tokens": 2, "stall_s": 600}
    )
    resp = await session.post(sim.url + COMPLETIONS, json=completion(1000, stream=True))
    try:
        first = [await resp.content.readuntil(b"\n\n") for _ in range(2)]
        assert all(chunk.startswith(b"data: {") for chunk in first)
        assert await nothing_arrives(resp)  # stalled after exactly two tokens
        assert (await counters(session, sim))["running"] == 1  # paused, still holding its slot
    finally:
        resp.close()  # a client timing out the idle gap
    await idle(session, sim, aborted=1)


async def test_stall_resumes_after_the_pause(
    sim: SimHandle, session: aiohttp.ClientSession
) -> None:
    await set_faults(
        session, sim, {"kind": "stall_between_tokens", "after_tokens": 2, "stall_s": 0.05}
    )
    async with session.post(sim.url + COMPLETIONS, json=completion(6, stream=True)) as resp:
        events = await read_sse(resp)
    assert events[-1] == "[DONE]" and len(events) == 7  # every token, then a clean end
    async with session.post(sim.url + COMPLETIONS, json=completion(6)) as resp:
        assert (await resp.json())["usage"]["completion_tokens"] == 6
    await idle(session, sim, aborted=0)


async def test_slow_tokens_fall_behind_a_normal_request(
    sim: SimHandle, session: aiohttp.ClientSession
) -> None:
    # A factor this large keeps the slowed request at its first token while the normal one,
    # sent later, finishes: the engine's steps are the clock here, not the wall.
    await set_faults(session, sim, {"kind": "slow_tokens", "factor": 1e9, "count": 1})
    slow = await session.post(sim.url + COMPLETIONS, json=completion(5, stream=True))
    try:
        assert (await slow.content.readuntil(b"\n\n")).startswith(b"data: {")
        async with session.post(sim.url + COMPLETIONS, json=completion(5)) as resp:
            assert (await resp.json())["usage"]["completion_tokens"] == 5
        stats = await counters(session, sim)
        assert stats["running"] == 1 and stats["finished"] == 1
    finally:
        slow.close()
    await idle(session, sim, aborted=1)


async def test_probabilistic_faults_repeat_with_the_seed(
    sim: SimHandle, session: aiohttp.ClientSession
) -> None:
    async def outcomes() -> list[int]:
        await set_faults(session, sim, {"kind": "status", "probability": 0.5}, seed=7)
        statuses = []
        for _ in range(24):
            async with session.post(sim.url + COMPLETIONS, json=completion(1)) as resp:
                statuses.append(resp.status)
        return statuses

    first = await outcomes()
    assert set(first) == {200, 503}
    assert await outcomes() == first  # posting the script again restarts the generator


async def test_script_validation_and_view(sim: SimHandle, session: aiohttp.ClientSession) -> None:
    for bad in (
        {"faults": [{"kind": "explode"}]},
        {"faults": [{"kind": "refuse", "after_tokens": 3}]},  # a field refuse does not take
        {"faults": [{"kind": "status", "status": 404}]},
        {"faults": [{"kind": "slow_tokens", "scope": "all"}]},
        {"faults": [{"kind": "refuse", "probability": 0}]},
    ):
        async with session.post(sim.url + "/sim/faults", json=bad) as resp:
            assert resp.status == 400, bad
            assert (await resp.json())["error"]["type"] == "BadRequestError"
    # A bare rule is a script of one; the view lists every field with its state.
    async with session.post(
        sim.url + "/sim/faults", json={"kind": "die_mid_stream", "after_tokens": 1}
    ) as resp:
        view = await resp.json()
    (rule,) = view["faults"]
    assert rule["kind"] == "die_mid_stream" and rule["after_tokens"] == 1
    assert rule["remaining"] is None and rule["injected"] == 0
    async with session.get(sim.url + "/sim/faults") as resp:
        assert await resp.json() == view


async def test_faults_from_the_config_apply_at_start(session: aiohttp.ClientSession) -> None:
    specs = (parse_fault_spec("status:status=502,count=1"), parse_fault_spec("refuse:count=1"))
    sim = await start_sim_worker(SimConfig(model=MODEL, port=0, time_scale=0, faults=specs))
    try:
        async with session.post(sim.url + COMPLETIONS, json=completion()) as resp:
            assert resp.status == 502
        with pytest.raises(aiohttp.ClientConnectionError):
            async with session.post(sim.url + COMPLETIONS, json=completion()) as resp:
                await resp.read()
        await assert_serves_normally(session, sim)
        assert (await counters(session, sim))["faults_injected"] == 2
        async with session.post(sim.url + "/sim/reset") as resp:
            assert resp.status == 200
        assert (await counters(session, sim))["faults_injected"] == 0
    finally:
        await sim.stop()
