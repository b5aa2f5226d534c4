"""The supervisor of background loops: restart with growing, capped, jittered backoff, a reset
after a good run, the restart metric, and cancellation that always stops.

Time is driven by hand: the supervisor gets a recording sleep and a fake clock, so nothing here
waits on the wall clock (wait_for only bounds a condition the event loop reaches at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

import pytest

from router.metrics import GatewayMetrics
from router.supervisor import Backoff, Supervisor, redact
from tests.conftest import wait_for


class FakeTime:
    """A clock the test moves, and a sleep that records its delay and moves the clock by it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self.hold = asyncio.Event()  # set: sleeps return at once; clear: they wait for it
        self.hold.set()

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay_s: float) -> None:
        self.sleeps.append(delay_s)
        self.now += delay_s
        await asyncio.sleep(0)  # a real sleep always yields to the event loop; so does this one
        await self.hold.wait()


def _restarts(metrics: GatewayMetrics, loop: str) -> float | None:
    return metrics.registry.get_sample_value(
        "prefix_router_background_restarts_total", {"loop": loop}
    )


BACKOFF = Backoff(initial_s=0.5, max_s=4.0, factor=2.0, jitter=0.2, healthy_after_s=60.0)


async def test_a_failing_loop_is_restarted_with_growing_capped_backoff_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="prefix_router.supervisor")
    metrics = GatewayMetrics(lambda: [])
    fake = FakeTime()
    supervisor = Supervisor(
        metrics.background_restarts,
        BACKOFF,
        sleep=fake.sleep,
        clock=fake.clock,
        rng=random.Random(7),
    )
    calls = 0
    parked = asyncio.Event()

    async def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls <= 6:
            raise RuntimeError("redis://user:hunter2@db:6380 said no")
        parked.set()
        await asyncio.Event().wait()  # runs fine from now on, until cancelled

    task = supervisor.start("health", flaky)
    assert _restarts(metrics, "health") == 0  # the series exists before any failure
    await wait_for(parked.is_set, what="the loop running again after six failures")

    assert calls == 7
    assert _restarts(metrics, "health") == 6
    bases = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]  # doubles, then capped at max_s
    assert len(fake.sleeps) == len(bases)
    for delay, base in zip(fake.sleeps, bases, strict=True):
        assert base * (1 - BACKOFF.jitter) <= delay <= base
    assert fake.sleeps[:4] == sorted(fake.sleeps[:4]) and len(set(fake.sleeps)) == 6  # jittered
    failures = [r for r in caplog.records if "background loop health failed" in r.getMessage()]
    assert len(failures) == 6, "each failure is logged once"
    assert all("hunter2" not in r.getMessage() for r in caplog.records)
    assert "RuntimeError" in failures[0].getMessage()

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _restarts(metrics, "health") == 6, "a cancellation is not a failure"


async def test_backoff_starts_over_after_the_loop_ran_fine_for_a_while() -> None:
    metrics = GatewayMetrics(lambda: [])
    fake = FakeTime()
    supervisor = Supervisor(
        metrics.background_restarts, BACKOFF, sleep=fake.sleep, clock=fake.clock
    )
    calls = 0
    parked = asyncio.Event()

    async def loop() -> None:
        nonlocal calls
        calls += 1
        if calls == 4:
            fake.now += BACKOFF.healthy_after_s  # this run lasted long enough to count as fine
        if calls <= 4:
            raise ValueError("boom")
        parked.set()
        await asyncio.Event().wait()

    task = supervisor.start("discovery", loop)
    await wait_for(parked.is_set, what="the fifth run")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(fake.sleeps) == 4
    assert fake.sleeps[2] > 1.0 * (1 - BACKOFF.jitter)  # third failure in a row: about 2 s
    assert fake.sleeps[3] <= BACKOFF.initial_s  # after a good run: the initial delay again
    assert _restarts(metrics, "discovery") == 4


async def test_a_loop_that_returns_is_restarted_too() -> None:
    metrics = GatewayMetrics(lambda: [])
    fake = FakeTime()
    supervisor = Supervisor(metrics.background_restarts, BACKOFF, sleep=fake.sleep)
    runs = 0

    async def quits() -> None:
        nonlocal runs
        runs += 1

    supervisor.start("kv_follower", quits)
    await wait_for(lambda: runs >= 3, what="three runs")
    await supervisor.stop()
    assert _restarts(metrics, "kv_follower") == len(fake.sleeps) >= 3


async def test_stop_cancels_during_the_backoff_and_inside_a_loop_that_hides_cancellation() -> None:
    metrics = GatewayMetrics(lambda: [])
    fake = FakeTime()
    fake.hold.clear()  # every backoff sleep waits until cancelled
    supervisor = Supervisor(metrics.background_restarts, BACKOFF, sleep=fake.sleep)
    entered = asyncio.Event()

    async def fails() -> None:
        raise RuntimeError("boom")

    async def hides_cancellation() -> None:
        # What redis-py can do: turn the cancellation of a command into an error of its own.
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise ConnectionError("connection closed") from None

    in_backoff = supervisor.start("load_scrape", fails)
    hiding = supervisor.start("index_follower", hides_cancellation)
    await wait_for(lambda: len(fake.sleeps) == 1 and entered.is_set(), what="both loops parked")

    await asyncio.wait_for(supervisor.stop(), timeout=10.0)
    assert in_backoff.cancelled()
    assert hiding.cancelled()
    assert _restarts(metrics, "index_follower") == 0, "the hidden cancellation is not a failure"
    assert _restarts(metrics, "load_scrape") == 1


def test_redact_masks_url_credentials_and_bearer_tokens() -> None:
    text = redact("redis://:s3cret@h:1/0 and https://u:p@w/x and Authorization: Bearer sk-abc")
    assert "s3cret" not in text and "u:p@" not in text and "sk-abc" not in text
    assert "redis://***@h:1/0" in text


async def test_stop_ends_a_loop_whose_client_swallows_the_first_cancellation() -> None:
    # What redis-py's pipeline did at shutdown: cancelled while reading a reply, it caught the
    # cancellation and went on waiting, and the gateway's exit hung (seen in CI).
    supervisor = Supervisor(None, BACKOFF)
    entered = asyncio.Event()

    async def swallows_once() -> None:
        entered.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
        await asyncio.Event().wait()  # a second cancellation ends it

    task = supervisor.start("discovery", swallows_once)
    await wait_for(entered.is_set, what="the loop is waiting")
    await asyncio.wait_for(supervisor.stop(), timeout=10.0)
    assert task.done()


async def test_stop_gives_up_on_a_loop_that_never_ends() -> None:
    supervisor = Supervisor(None, BACKOFF)
    release = asyncio.Event()

    async def immortal() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue

    task = supervisor.start("stuck", immortal)
    await asyncio.wait_for(supervisor.stop(grace_s=0.2), timeout=10.0)  # returns, never hangs
    assert not task.done()
    release.set()
    with contextlib.suppress(asyncio.CancelledError):
        await task  # once it does end, the pending cancellation stops it: no restart
    assert task.done()
