"""P/D disaggregation in the simulated worker, as vLLM's NixlConnector behaves on the wire
(`reference/vllm-pd-lora-continuation.md` §1).

A prefill worker given `kv_transfer_params.do_remote_decode` answers its length-capped one-token
request with `kv_transfer_params` naming its blocks, and holds those blocks for a lease
(`kv_lease_s`) instead of freeing them. A decode worker given params with `do_remote_prefill`
pulls the blocks from the prefill worker named by `remote_host` and `remote_port` (the
simulator's side channel is its HTTP port: `POST /sim/kv_pull`, which ends the lease); it waits
out a transfer cost per token (outside the engine's steps, as vLLM's asynchronous NIXL reads
do), then skips that prefill and reports the prompt as cached. A pull that finds no lease
(expired, or the prefill worker died) fails the request with a 500, as vLLM's
`kv_load_failure_policy: fail` does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp

from workers.sim.cache import PrefixCache, SeqBlocks


def wants_remote_decode(params: Any) -> bool:
    return isinstance(params, dict) and params.get("do_remote_decode") is True


def remote_prefill(params: Any) -> dict[str, Any] | None:
    """The params of a decode request whose prompt KV waits on a prefill worker, if any."""
    if isinstance(params, dict) and params.get("do_remote_prefill") is True:
        return params
    return None


class KVLeases:
    """Blocks a prefill worker holds for decode workers to pull, each until pulled or expired."""

    def __init__(self, cache: PrefixCache, lease_s: float) -> None:
        self._cache = cache
        self._lease_s = lease_s
        self._held: dict[str, tuple[SeqBlocks, asyncio.TimerHandle]] = {}

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, request_id: str, blocks: SeqBlocks) -> None:
        loop = asyncio.get_running_loop()
        expire: Callable[[], object] = lambda: self.release(request_id)  # noqa: E731
        self._held[request_id] = (blocks, loop.call_later(self._lease_s, expire))

    def release(self, request_id: str) -> bool:
        """End a lease: its blocks go back to the cache (still cached, no longer pinned)."""
        held = self._held.pop(request_id, None)
        if held is None:
            return False
        blocks, timer = held
        timer.cancel()
        self._cache.free(blocks)
        return True

    def release_all(self) -> None:
        for request_id in list(self._held):
            self.release(request_id)


def transfer_params(
    block_ids: list[int], engine_id: str, request_id: str, host: str, port: int
) -> dict[str, Any]:
    """What a prefill answer carries for the decode worker (NixlConnector v2's keys)."""
    return {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_block_ids": block_ids,
        "remote_engine_id": engine_id,
        "remote_request_id": request_id,
        "remote_host": host,
        "remote_port": port,
        "tp_size": 1,
    }


async def pull(session: aiohttp.ClientSession, params: dict[str, Any], timeout_s: float) -> bool:
    """Read the blocks from the prefill worker (ending its lease); False if it has none."""
    host, port = params.get("remote_host"), params.get("remote_port")
    if not isinstance(host, str) or not isinstance(port, int):
        return False
    url = f"http://{host}:{port}/sim/kv_pull"
    body = {"remote_request_id": params.get("remote_request_id")}
    try:
        async with session.post(
            url, json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as resp:
            return resp.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False
