"""The simulated worker's continuous-batching engine, stepped as fast as the loop allows."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from workers.sim.cache import BlocksRemoved, BlocksStored, PrefixCache
from workers.sim.config import SimConfig
from workers.sim.engine import RequestState, RequestTooLargeError, SimEngine


class StepProbe:
    """Counts engine steps and records how many sequences ran in each."""

    def __init__(self, engine: SimEngine | None = None) -> None:
        self.engine = engine
        self.steps = 0
        self.running: list[int] = []

    def blocks_stored(self, event: BlocksStored) -> None:
        pass

    def blocks_removed(self, event: BlocksRemoved) -> None:
        pass

    def all_blocks_cleared(self) -> None:
        pass

    def step_finished(self) -> None:
        self.steps += 1
        if self.engine is not None:
            self.running.append(self.engine.num_running)


@asynccontextmanager
async def started(config: SimConfig) -> AsyncIterator[tuple[SimEngine, StepProbe]]:
    cache = PrefixCache(config.num_gpu_blocks, config.block_size)
    engine = SimEngine(config, cache)
    probe = StepProbe(engine)
    cache.add_listener(probe)
    task = asyncio.create_task(engine.run())
    try:
        yield engine, probe
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def config(**overrides: object) -> SimConfig:
    return SimConfig.model_validate({"model": "m", "time_scale": 0, **overrides})


async def test_long_prompt_is_prefilled_in_chunks() -> None:
    cfg = config(max_num_batched_tokens=64, max_num_seqs=4)
    async with started(cfg) as (engine, probe):
        req = engine.submit("r", list(range(200)), [1, 2, 3])
        await engine.wait_done(req)
        # ceil(200 / 64) = 4 prefill steps (the last samples token 1), then 2 decode steps.
        assert probe.steps == 6
        assert req.state is RequestState.FINISHED and req.num_generated == 3
        assert req.first_token_s is not None and req.finish_s is not None


async def test_admission_respects_max_num_seqs() -> None:
    async with started(config(max_num_seqs=2, max_num_batched_tokens=64)) as (engine, probe):
        reqs = [engine.submit(f"r{i}", [i] * 20, [1] * 4) for i in range(5)]
        assert engine.num_waiting == 5
        await asyncio.gather(*(engine.wait_done(r) for r in reqs))
        assert max(probe.running) <= 2
        assert engine.counters.finished == 5 and engine.num_running == 0


async def test_admission_waits_for_kv_blocks() -> None:
    # Each request needs 3 blocks of 16; 4 blocks hold only one at a time.
    async with started(config(num_gpu_blocks=4)) as (engine, probe):
        reqs = [engine.submit(f"r{i}", [i] * 40, [1] * 8) for i in range(3)]
        await asyncio.gather(*(engine.wait_done(r) for r in reqs))
        assert max(probe.running) == 1
        assert engine.cache.free_blocks == 4


async def test_request_larger_than_cache_is_refused() -> None:
    async with started(config(num_gpu_blocks=2)) as (engine, _):
        with pytest.raises(RequestTooLargeError):
            engine.submit("r", [1] * 30, [1] * 3)


async def test_abort_waiting_and_running_requests() -> None:
    cfg = config(max_num_seqs=1, max_num_batched_tokens=16, num_gpu_blocks=64)
    async with started(cfg) as (engine, _):
        running = engine.submit("a", list(range(40)), [1] * 500)
        waiting = engine.submit("b", list(range(40)), [1] * 10)
        await engine.wait_progress(running, 0)
        assert engine.num_running == 1 and engine.num_waiting == 1
        engine.abort(waiting)
        engine.abort(running)
        assert running.state is RequestState.ABORTED and waiting.state is RequestState.ABORTED
        assert engine.counters.aborted == 2 and engine.num_running == engine.num_waiting == 0
        assert engine.cache.free_blocks == 64
        # Prompt blocks computed before the abort stay cached.
        again = engine.submit("c", list(range(40)), [1])
        await engine.wait_done(again)
        assert again.num_cached_tokens == 32


async def test_output_blocks_are_cached() -> None:
    async with started(config()) as (engine, _):
        first = engine.submit("a", list(range(20)), list(range(100, 140)))
        await engine.wait_done(first)
        # prompt + output = 60 tokens; 59 computed -> 3 full blocks cached.
        follow = engine.submit("b", [*range(20), *range(100, 140), 7, 8], [1])
        await engine.wait_done(follow)
        assert follow.num_cached_tokens == 48
