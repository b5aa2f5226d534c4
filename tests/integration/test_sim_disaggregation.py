"""The simulated worker plays both sides of vLLM's NixlConnector: a prefill worker answers a
remote-decode request with `kv_transfer_params` naming its blocks and holds them for a lease; a
decode worker given those params pulls the blocks (ending the lease), skips the prefill and
reports the prompt as cached; a pull that finds no lease fails the request, as vLLM's
`kv_load_failure_policy: fail` does. Real workers on ephemeral ports."""

from __future__ import annotations

from typing import Any

import aiohttp

from router.upstream.disaggregation import REMOTE_DECODE
from tests.conftest import MODEL, SimFactory, wait_for
from workers.cli import _build_parser

PROMPT = " ".join(f"tok{i}" for i in range(300))


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Any:
    async with http.post(url + "/v1/completions", json=body) as resp:
        return resp.status, await resp.json()


async def counters(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url + "/sim/counters") as resp:
        return await resp.json()


def prefill_body() -> dict[str, Any]:
    return {"model": MODEL, "prompt": PROMPT, "max_tokens": 1, "kv_transfer_params": REMOTE_DECODE}


async def test_prefill_then_decode_skips_the_prefill(
    sims: SimFactory, http: aiohttp.ClientSession
) -> None:
    (prefill,) = await sims(1, role="prefill")
    (decode,) = await sims(1, role="decode")
    (plain,) = await sims(1)
    status, answer = await post(http, prefill.url, prefill_body())
    assert status == 200 and answer["choices"][0]["finish_reason"] == "length"
    params = answer["kv_transfer_params"]
    assert params["do_remote_prefill"] is True and params["remote_block_ids"]
    assert params["remote_port"] == prefill.port and params["remote_request_id"]
    assert (await counters(http, prefill.url))["kv_leases"] == 1

    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "kv_transfer_params": params}
    status, answer = await post(http, decode.url, body)
    assert status == 200, answer
    usage = answer["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"]
    assert (await counters(http, prefill.url))["kv_leases"] == 0  # pulled: lease over
    assert (await counters(http, decode.url))["cached_tokens"] == usage["prompt_tokens"]
    # The decode worker's answer is the one an aggregated worker gives.
    _, whole = await post(http, plain.url, {"model": MODEL, "prompt": PROMPT, "max_tokens": 12})
    assert answer["choices"][0]["text"] == whole["choices"][0]["text"]
    # The params are spent: a second pull finds no lease, and the request fails.
    status, error = await post(http, decode.url, body)
    assert status == 500 and error["error"]["code"] == 500


async def test_an_unpulled_lease_expires(sims: SimFactory, http: aiohttp.ClientSession) -> None:
    (prefill,) = await sims(1, role="prefill", kv_lease_s=0.2)
    status, answer = await post(http, prefill.url, prefill_body())
    assert status == 200 and "kv_transfer_params" in answer

    async def released() -> bool:
        return bool((await counters(http, prefill.url))["kv_leases"] == 0)

    await wait_for(released, what="the lease expired")


async def test_roles_decide_which_params_are_honoured(
    sims: SimFactory, http: aiohttp.ClientSession
) -> None:
    (decode,) = await sims(1, role="decode")
    status, answer = await post(http, decode.url, prefill_body())
    # A decode-only worker does not prefill for others: a plain one-token answer.
    assert status == 200 and "kv_transfer_params" not in answer
    assert (await counters(http, decode.url))["kv_leases"] == 0


def test_the_role_flags_parse() -> None:
    args = _build_parser().parse_args(
        ["sim", "--model", "m", "--role", "prefill", "--kv-lease-s", "5"]
    )
    assert (args.role, args.kv_lease_s) == ("prefill", 5.0)
