"""Fault scripts without HTTP: the ``--fault`` syntax, the injector, the engine's slowdown."""

from __future__ import annotations

import asyncio
import math

import pytest

from workers.sim.cache import BlocksRemoved, BlocksStored, PrefixCache
from workers.sim.config import SimConfig
from workers.sim.engine import SimEngine
from workers.sim.fault_spec import FaultSpec, parse_fault_spec
from workers.sim.faults import FaultInjector


def test_cli_syntax() -> None:
    assert parse_fault_spec("refuse") == FaultSpec(kind="refuse")
    spec = parse_fault_spec("status:status=429, retry_after_s=2,count=3")
    assert (spec.kind, spec.status, spec.retry_after_s, spec.count) == ("status", 429, 2, 3)
    spec = parse_fault_spec("die_mid_stream:after_tokens=5,probability=0.25")
    assert spec.after_tokens == 5 and spec.probability == 0.25 and spec.count is None
    spec = parse_fault_spec('{"kind": "slow_tokens", "factor": 4}')
    assert spec.kind == "slow_tokens" and spec.factor == 4.0


@pytest.mark.parametrize(
    "text",
    [
        "explode",
        "status:status=404",
        "refuse:after_tokens=2",  # not a field of refuse
        "stall_between_tokens:stall_s",  # no value
        "slow_tokens:factor=0.5",
        "die_mid_stream:scope=all",
        "refuse:count=0",
        "{not json",
    ],
)
def test_cli_syntax_errors(text: str) -> None:
    with pytest.raises(ValueError, match="invalid fault"):
        parse_fault_spec(text)


def test_first_eligible_rule_wins_and_counts_run_out() -> None:
    injector = FaultInjector(
        [
            FaultSpec(kind="status", count=1),
            FaultSpec(kind="refuse", count=2, scope="all"),
        ]
    )
    drawn = [injector.draw(inference=True) for _ in range(4)]
    assert [d.spec.kind if d else None for d in drawn] == ["status", "refuse", "refuse", None]
    assert injector.injected == 3 and injector.injected_by_kind == {"status": 1, "refuse": 2}
    assert [r.remaining for r in injector.rules] == [0, 0]


def test_scope_limits_non_inference_endpoints() -> None:
    injector = FaultInjector([FaultSpec(kind="status"), FaultSpec(kind="refuse", scope="all")])
    drawn = injector.draw(inference=False)
    assert drawn is not None and drawn.spec.kind == "refuse"


def test_probabilistic_draws_follow_the_seed() -> None:
    def pattern(seed: int) -> list[bool]:
        injector = FaultInjector([FaultSpec(kind="refuse", probability=0.3)], seed=seed)
        return [injector.draw(inference=True) is not None for _ in range(200)]

    assert pattern(1) == pattern(1)
    assert pattern(1) != pattern(2)
    assert 0 < sum(pattern(1)) < 200


async def test_clearing_releases_hung_requests() -> None:
    injector = FaultInjector([FaultSpec(kind="hang_before_first_byte")])
    drawn = injector.draw(inference=True)
    assert drawn is not None and not drawn.released.is_set()
    injector.clear()
    assert drawn.released.is_set() and not injector.active


class StepCounter:
    def __init__(self) -> None:
        self.steps = 0

    def blocks_stored(self, event: BlocksStored) -> None:
        pass

    def blocks_removed(self, event: BlocksRemoved) -> None:
        pass

    def all_blocks_cleared(self) -> None:
        pass

    def step_finished(self) -> None:
        self.steps += 1


@pytest.mark.parametrize(("factor", "steps"), [(1.0, 5), (3.0, 13)])
async def test_slowdown_multiplies_the_steps_per_token(factor: float, steps: int) -> None:
    # One prefill step yields the first token; each of the other 4 then takes `factor` steps.
    config = SimConfig(model="m", time_scale=0)
    cache = PrefixCache(config.num_gpu_blocks, config.block_size)
    engine = SimEngine(config, cache)
    counter = StepCounter()
    cache.add_listener(counter)
    task = asyncio.create_task(engine.run())
    try:
        req = engine.submit("r", [1, 2, 3], [4, 5, 6, 7, 8])
        engine.set_slowdown(req, factor)
        await engine.wait_done(req)
        assert req.num_generated == 5 and counter.steps == steps
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_paused_request_idles_the_engine_until_resumed() -> None:
    config = SimConfig(model="m", time_scale=0)
    cache = PrefixCache(config.num_gpu_blocks, config.block_size)
    engine = SimEngine(config, cache)
    counter = StepCounter()
    cache.add_listener(counter)
    task = asyncio.create_task(engine.run())
    try:
        req = engine.submit("r", [1, 2, 3], [4, 5, 6])
        engine.set_slowdown(req, math.inf)
        await engine.wait_progress(req, 0)  # the prefill still completes: first token
        steps = counter.steps
        for _ in range(50):
            await asyncio.sleep(0)  # give a spinning engine every chance to step
        assert counter.steps == steps and req.num_generated == 1 and engine.num_running == 1
        engine.set_slowdown(req, 1.0)
        await engine.wait_done(req)
        assert req.num_generated == 3
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
