"""Continuous-batching engine of the simulated worker: one asyncio task, one step at a time.

Each step mirrors vLLM's scheduler closely enough for routing to feel real: running sequences
that finished their prefill decode one token each; sequences still prefilling get the rest of the
step's token budget (``max_num_batched_tokens``, so long prompts are prefilled in chunks over
several steps); then waiting requests are admitted in arrival order while fewer than
``max_num_seqs`` run and the KV cache can hold them, their cached prefix skipping prefill. The
step then "runs" for ``step_overhead_s + prefill_tokens * prefill_s_per_token + decodes *
decode_s_per_seq`` (times ``time_scale``), after which its results land: blocks become cached,
tokens appear, finished sequences release their blocks. Consumers wait on a per-request future,
so a token costs an integer increment and, at most, one wake-up. An idle engine waits on an
event. Aborting a request (the client went away) frees its blocks at once; full blocks stay
cached, so the prefill already done still helps later requests.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable, Sequence

from router.vllm_wire.block_hash import (
    LoraKey,
    block_extra_keys,
    block_hashes,
    hash_block_tokens,
    none_hash,
)
from workers.sim.cache import PrefixCache
from workers.sim.config import SimConfig
from workers.sim.kv_transfer import KVLeases
from workers.sim.lora import SimAdapters
from workers.sim.sequence import RequestState, SimCounters, SimRequest

__all__ = ["RequestState", "RequestTooLargeError", "SimCounters", "SimEngine", "SimRequest"]


class RequestTooLargeError(ValueError):
    """The request can never fit in the KV cache, however empty (a 400 for the client)."""


FinishCallback = Callable[[SimRequest], None]


class SimEngine:
    """The scheduler and step clock; ``run()`` is the single task that drives it."""

    def __init__(
        self, config: SimConfig, cache: PrefixCache, adapters: SimAdapters | None = None
    ) -> None:
        self.config = config
        self.cache = cache
        self.adapters = adapters or SimAdapters(dict(config.lora_modules), config.max_loras)
        self._load_s = 0.0  # adapter loads of the step being scheduled
        self.leases = KVLeases(cache, config.kv_lease_s)
        self.counters = SimCounters()
        self._waiting: deque[SimRequest] = deque()
        self._running: dict[SimRequest, None] = {}  # insertion-ordered set, O(1) removal
        self._wakeup = asyncio.Event()
        self._finish_callbacks: list[FinishCallback] = []
        self._block_size = config.block_size
        self._none_hash = none_hash(config.hash_algo, config.hash_seed)

    # -- introspection -------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def adapters_in_use(self) -> tuple[list[str], list[str]]:
        """Adapter names of the running and of the waiting requests (vLLM's metric labels)."""
        running = [r.lora[0] for r in self._running if r.lora is not None]
        waiting = [r.lora[0] for r in self._waiting if r.lora is not None]
        return running, waiting

    def add_finish_callback(self, callback: FinishCallback) -> None:
        """Called once per request when it finishes or is aborted (metrics, later KV events)."""
        self._finish_callbacks.append(callback)

    # -- consumer side --------------------------------------------------------------------

    def submit(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        output_ids: Sequence[int],
        cache_salt: str | None = None,
        stream_tokens: bool = True,
        lora: LoraKey | None = None,
        lease: bool = False,
        remote_prefilled: bool = False,
    ) -> SimRequest:
        """Queue a request that will generate exactly ``output_ids``."""
        cfg = self.config
        if not prompt_ids or not output_ids:
            raise RequestTooLargeError("prompt and output must each hold at least one token")
        total = len(prompt_ids) + len(output_ids)
        if self.cache.blocks_needed(total) > self.cache.num_blocks:
            raise RequestTooLargeError(
                f"request needs {total} tokens of KV cache but this worker holds "
                f"{self.cache.num_blocks * self._block_size}"
            )
        hashes = block_hashes(
            prompt_ids, self._block_size, cfg.hash_algo, cfg.hash_seed, cache_salt, lora=lora
        )
        now = asyncio.get_running_loop().time()
        req = SimRequest(
            request_id, prompt_ids, output_ids, hashes, cache_salt, now, stream_tokens, lora
        )
        req.lease, req.remote_prefilled = lease, remote_prefilled
        self._waiting.append(req)
        self.counters.requests += 1
        self._wakeup.set()
        return req

    async def wait_progress(self, req: SimRequest, seen: int) -> None:
        """Return once ``req`` has more than ``seen`` tokens or is done."""
        if req.num_generated > seen or req.done:
            return
        waiter = asyncio.get_running_loop().create_future()
        req.waiter = waiter
        await waiter

    async def wait_done(self, req: SimRequest) -> None:
        """Return once ``req`` finished or was aborted."""
        while not req.done:
            await self.wait_progress(req, req.num_generated)

    def abort(self, req: SimRequest) -> None:
        """Drop a request whose consumer went away; its computed full blocks stay cached."""
        if req.done:
            return
        if req.state is RequestState.WAITING:
            self._waiting.remove(req)
        else:
            del self._running[req]
            if req.blocks is not None:
                self.cache.free(req.blocks)
        self.counters.aborted += 1
        self._finish(req, RequestState.ABORTED, "abort", asyncio.get_running_loop().time())

    def abort_all(self) -> None:
        for req in [*self._waiting, *self._running]:
            self.abort(req)
        self.leases.release_all()

    def set_slowdown(self, req: SimRequest, factor: float) -> None:
        """Fault injection: ``req`` decodes one token per ``factor`` steps; ``math.inf`` pauses it.

        A paused sequence keeps its slot and blocks (a stuck request still counts as running) but
        is left out of the steps, so an engine with nothing else to do sleeps instead of spinning.
        """
        req.slowdown = factor
        req.slow_credit = 0.0
        self._wakeup.set()

    def reset(self) -> None:
        """Zero the counters and forget the prefix cache (running requests keep their blocks)."""
        self.counters.reset()
        self.cache.reset()

    # -- the step loop ----------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        try:
            while True:
                if not self._waiting and not self._running:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                prefill, decode = self._schedule()
                if not prefill and not decode:
                    # Nothing fits and nothing runs: only an abort or arrival can change that.
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                n_prefill = sum(n for _, n in prefill)
                duration_s = (
                    cfg.step_overhead_s
                    + n_prefill * cfg.prefill_s_per_token
                    + len(decode) * cfg.decode_s_per_seq
                    + self._load_s
                ) * cfg.time_scale
                await asyncio.sleep(duration_s)  # sleep(0) still yields to the loop
                self._apply(prefill, decode, loop.time())
                self.cache.end_step()
        finally:
            self.abort_all()

    def _schedule(self) -> tuple[list[tuple[SimRequest, int]], list[SimRequest]]:
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        decode: list[SimRequest] = []
        prefill: list[tuple[SimRequest, int]] = []
        for req in self._running:
            if req.num_computed == req.num_prompt and req.slowdown != math.inf:
                decode.append(req)
        budget -= len(decode)  # config guarantees budget >= max_num_seqs
        for req in self._running:
            remaining = req.num_prompt - req.num_computed
            if remaining and budget > 0:
                n = min(remaining, budget)
                prefill.append((req, n))
                budget -= n
        waiting = self._waiting
        counters = self.counters
        adapters = self.adapters
        active = {r.lora[0] for r in self._running if r.lora is not None}
        skipped: list[SimRequest] = []  # their adapter found no slot: later ones go first
        self._load_s = 0.0
        while waiting and budget > 0 and len(self._running) < cfg.max_num_seqs:
            req = waiting[0]
            if req.lora is not None:
                loaded = adapters.admit(req.lora[0], active)
                if loaded is None:
                    skipped.append(waiting.popleft())
                    continue
                active.add(req.lora[0])
                if loaded:
                    self._load_s += cfg.lora_load_s
            total = req.num_prompt + req.max_tokens
            blocks = self.cache.allocate(req.hashes, req.num_prompt, total)
            if blocks is None:
                break  # FCFS: the head waits for room rather than being overtaken
            waiting.popleft()
            req.blocks = blocks
            req.state = RequestState.RUNNING
            self._running[req] = None
            cached = blocks.num_hit_blocks * self._block_size
            if req.remote_prefilled:
                # The prompt's KV came from the prefill worker (the handler waited for the
                # transfer, which vLLM runs beside the engine's steps): nothing to prefill, and
                # vLLM's decode counts all of it as cached.
                cached = req.num_prompt
            req.num_computed = req.num_cached_tokens = cached
            counters.prompt_tokens += req.num_prompt
            counters.cached_tokens += cached
            n = min(req.num_prompt - cached, budget)
            prefill.append((req, n))
            budget -= n
        waiting.extendleft(reversed(skipped))
        return prefill, decode

    def _apply(
        self, prefill: list[tuple[SimRequest, int]], decode: list[SimRequest], now: float
    ) -> None:
        cache = self.cache
        running = RequestState.RUNNING
        progressed: list[SimRequest] = []
        for req, n in prefill:
            if req.state is not running or req.blocks is None:
                continue  # aborted while the step ran
            req.num_computed += n
            cache.commit(req.blocks, req.hashes, req.all_tokens, req.num_computed, req.extras)
            if req.num_computed == req.num_prompt:
                req.num_generated = 1  # the step that ends the prefill samples the first token
                req.first_token_s = now
                progressed.append(req)
        cache_output = self.config.cache_output_blocks
        block_size = self._block_size
        for req in decode:
            if req.state is not running:
                continue
            if req.slowdown != 1.0:
                req.slow_credit += 1.0  # whole steps: exact for integral factors
                if req.slow_credit < req.slowdown:
                    continue
                req.slow_credit -= req.slowdown
            req.num_generated += 1
            progressed.append(req)
            # The newest token's KV is computed only by the next step, hence the - 1.
            computed = req.num_prompt + req.num_generated - 1
            if cache_output and computed // block_size > len(req.hashes) and req.blocks:
                self._hash_next_block(req)
                cache.commit(req.blocks, req.hashes, req.all_tokens, computed, req.extras)
        self.counters.generation_tokens += len(progressed)
        for req in progressed:
            if req.num_generated >= req.max_tokens:
                del self._running[req]
                if req.blocks is not None:
                    req.block_ids = [b.block_id for b in req.blocks.blocks]
                    if req.lease:
                        self.leases.hold(req.request_id, req.blocks)
                    else:
                        cache.free(req.blocks)
                self._finish(req, RequestState.FINISHED, "length", now)
            elif req.stream_tokens:
                waiter = req.waiter
                if waiter is not None:
                    req.waiter = None
                    if not waiter.done():
                        waiter.set_result(None)

    def _hash_next_block(self, req: SimRequest) -> None:
        index = len(req.hashes)
        start = index * self._block_size
        parent = req.hashes[-1] if req.hashes else self._none_hash
        req.hashes.append(
            hash_block_tokens(
                parent,
                tuple(req.all_tokens[start : start + self._block_size]),
                block_extra_keys(index, req.cache_salt, lora=req.lora),
                self.config.hash_algo,
            )
        )

    def _finish(self, req: SimRequest, state: RequestState, reason: str, now: float) -> None:
        req.state = state
        req.finish_reason = reason
        req.finish_s = now
        counters = self.counters
        if state is RequestState.FINISHED:
            counters.finished += 1
        by_reason = counters.finished_by_reason
        by_reason[reason] = by_reason.get(reason, 0) + 1
        for callback in self._finish_callbacks:
            callback(req)
        waiter = req.waiter
        if waiter is not None:
            req.waiter = None
            if not waiter.done():
                waiter.set_result(None)
