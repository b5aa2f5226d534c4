"""The admission queue when a waiter's timeout and its admission land in the same loop pass.

The event loop's clock here moves only when the test advances it, so both timers fall due in
one pass, in the order the test chose: the slot is handed to the waiter, then its queue timeout
fires before it ran again. Whatever the waiter concludes, the slot must not be lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from router.admission import PoolGate
from router.config import parse_config
from router.domain.registry import Registry
from router.domain.worker import Health
from router.errors import NoCapacity
from router.metrics import GatewayMetrics
from router.routing.factory import PoolRoutingFactory

QUEUE_TIMEOUT_S = 5.0


class _ManualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock moves only when the test says so."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0

    def time(self) -> float:
        return self.now


def _run(scenario: Callable[[_ManualClockLoop], Coroutine[Any, Any, None]]) -> None:
    loop = _ManualClockLoop()
    try:
        loop.run_until_complete(scenario(loop))
    finally:
        loop.close()


def _gate() -> tuple[PoolGate, GatewayMetrics]:
    pool = {
        "workers": [{"url": "http://127.0.0.1:9"}],
        "admission": {"max_in_flight_per_worker": 1, "queue_timeout_s": QUEUE_TIMEOUT_S},
    }
    registry = Registry(
        parse_config({"auth": {"enabled": False}, "pools": {"m": pool}}), PoolRoutingFactory()
    )
    for worker in registry.workers():
        worker.health = Health.HEALTHY
    metrics = GatewayMetrics(registry.workers)
    return PoolGate(registry.pools["m"], metrics), metrics


async def _until_queued(metrics: GatewayMetrics, n: int) -> None:
    """Let the waiter task run up to its wait (a bounded number of loop passes, no clock)."""
    for _ in range(1000):
        depth = metrics.registry.get_sample_value(
            "prefix_router_queue_depth", {"pool": "m", "priority": "normal"}
        )
        if depth == n:
            return
        await asyncio.sleep(0)  # one loop pass; the clock does not move
    raise AssertionError(f"queue depth never reached {n}")


async def _admitted_as_timeout_fires(loop: _ManualClockLoop) -> None:
    gate, metrics = _gate()
    await gate.enter("normal")  # the only slot
    waiter = asyncio.create_task(gate.enter("normal"))
    await _until_queued(metrics, 1)
    timeout_at = loop.time() + QUEUE_TIMEOUT_S  # the frozen clock: the waiter's deadline
    # The holder finishes in the loop pass in which the waiter's timeout fires, just before it.
    loop.call_at(timeout_at - 1.0, gate.leave)
    loop.now = timeout_at + 1.0
    (outcome,) = await asyncio.gather(waiter, return_exceptions=True)
    if outcome is None:
        gate.leave()  # it was admitted: its request ends and gives the slot back
    else:
        assert isinstance(outcome, NoCapacity), outcome
    assert gate.in_flight == 0, "the slot leaked"
    assert not gate.saturated
    await gate.enter("normal")  # and the next request gets it at once
    assert gate.in_flight == 1


def test_a_waiter_admitted_as_its_queue_timeout_fires_does_not_leak_the_slot() -> None:
    _run(_admitted_as_timeout_fires)


async def _timeout_fires_before_admission(loop: _ManualClockLoop) -> None:
    gate, metrics = _gate()
    await gate.enter("normal")
    waiter = asyncio.create_task(gate.enter("normal"))
    await _until_queued(metrics, 1)
    timeout_at = loop.time() + QUEUE_TIMEOUT_S
    # The other order: the timeout fires first, then the slot frees in the same pass.
    loop.call_at(timeout_at + 0.5, gate.leave)
    loop.now = timeout_at + 1.0
    (outcome,) = await asyncio.gather(waiter, return_exceptions=True)
    assert isinstance(outcome, NoCapacity), outcome
    assert gate.in_flight == 0 and not gate.saturated
    await _until_queued(metrics, 0)


def test_a_waiter_timing_out_as_a_slot_frees_does_not_take_it() -> None:
    _run(_timeout_fires_before_admission)
