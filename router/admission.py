"""Priority admission: each pool's capacity, a priority queue in front of it, and shedding.

Capacity is `max_in_flight_per_worker x routable workers`. Requests beyond it wait in a queue
ordered by priority (high, normal, low; FIFO within a class) until a slot frees, or until their
queue timeout (then 429 or 503 with `Retry-After`). When the queue is full, the lowest-priority,
newest waiter is shed to make room for a higher-priority arrival; otherwise the arrival is
refused. Queue depth per pool and priority is a metric.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from dataclasses import dataclass, field

from router.config import AdmissionConfig
from router.domain.pool import Pool
from router.errors import NoCapacity, RateLimited
from router.metrics import GatewayMetrics

PRIORITY_RANK = {"high": 0, "normal": 1, "low": 2}


@dataclass(order=True)
class _Waiter:
    rank: int
    seq: int
    future: asyncio.Future[None] = field(compare=False)
    priority: str = field(compare=False)


def _admitted(waiter: _Waiter) -> bool:
    future = waiter.future
    return future.done() and not future.cancelled() and future.exception() is None


class PoolGate:
    def __init__(self, pool: Pool, metrics: GatewayMetrics) -> None:
        self.pool = pool
        self.in_flight = 0
        self._queue: list[_Waiter] = []
        self._seq = itertools.count()
        self._metrics = metrics

    @property
    def config(self) -> AdmissionConfig:
        return self.pool.config.admission

    def capacity(self) -> int:
        return self.config.max_in_flight_per_worker * len(self.pool.candidates())

    @property
    def saturated(self) -> bool:
        return bool(self._queue) or self.in_flight >= self.capacity()

    def _depth(self, priority: str, delta: int) -> None:
        self._metrics.queue_depth.labels(self.pool.name, priority).inc(delta)

    async def enter(self, priority: str) -> None:
        if not self._queue and self.in_flight < self.capacity():
            self.in_flight += 1
            return
        config = self.config
        rank = PRIORITY_RANK.get(priority, 1)
        if len(self._queue) >= config.queue_size:
            self._shed_for(rank, priority)
        waiter = _Waiter(
            rank, next(self._seq), asyncio.get_running_loop().create_future(), priority
        )
        heapq.heappush(self._queue, waiter)
        self._depth(priority, 1)
        try:
            async with asyncio.timeout(config.queue_timeout_s):
                await waiter.future
        except TimeoutError:
            if _admitted(waiter):
                # kick() handed us the slot in the loop pass in which the timeout fired: it is
                # ours now, and refusing would leave in_flight counting it forever.
                return
            self._forget(waiter)
            self._metrics.shed.labels(self.pool.name, priority, "queue_timeout").inc()
            error_type = RateLimited if config.timeout_status == 429 else NoCapacity
            raise error_type(
                f"pool `{self.pool.name}` is at capacity: waited {config.queue_timeout_s:g}s",
                retry_after_s=max(1.0, config.queue_timeout_s / 4),
                code="queue_timeout",
            ) from None
        except BaseException:
            if _admitted(waiter):
                self.leave()  # admitted just as we were cancelled: give the slot back
            else:
                self._forget(waiter)
            raise

    def _forget(self, waiter: _Waiter) -> None:
        if waiter in self._queue:
            self._queue.remove(waiter)
            heapq.heapify(self._queue)
            self._depth(waiter.priority, -1)

    def _shed_for(self, rank: int, priority: str) -> None:
        if self._queue:
            worst = max(self._queue, key=lambda w: (w.rank, w.seq))
            if worst.rank > rank:
                self._forget(worst)
                self._metrics.shed.labels(self.pool.name, worst.priority, "shed").inc()
                worst.future.set_exception(
                    NoCapacity(
                        f"pool `{self.pool.name}` is overloaded; shed for higher-priority work",
                        retry_after_s=2.0,
                        code="shed",
                    )
                )
                return
        self._metrics.shed.labels(self.pool.name, priority, "queue_full").inc()
        raise NoCapacity(
            f"pool `{self.pool.name}` is overloaded and its queue is full",
            retry_after_s=2.0,
            code="queue_full",
        )

    def leave(self) -> None:
        self.in_flight -= 1
        self.kick()

    def kick(self) -> None:
        """Admit waiters while there is capacity (after a release or a worker came back)."""
        if not self._queue:
            return
        capacity = self.capacity()
        while self._queue and self.in_flight < capacity:
            waiter = heapq.heappop(self._queue)
            self._depth(waiter.priority, -1)
            if waiter.future.done():
                continue
            self.in_flight += 1
            waiter.future.set_result(None)


class Admission:
    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics
        self._gates: dict[str, PoolGate] = {}

    def gate(self, pool: Pool) -> PoolGate:
        gate = self._gates.get(pool.name)
        if gate is None:
            self._gates[pool.name] = gate = PoolGate(pool, self._metrics)
        elif gate.pool is not pool:
            gate.pool = pool  # a reloaded pool keeps its gate: requests in flight still leave it
        return gate

    def kick_all(self) -> None:
        for gate in self._gates.values():
            gate.kick()

    def slot(self, gate: PoolGate, priority: str) -> Slot:
        return Slot(gate, priority)


class Slot:
    """`async with admission.slot(gate, priority)`: a place in the pool, given back on the way
    out. A class, not `@asynccontextmanager`: its generator and wrapper were 1.5% of a py-spy
    profile's samples under load (`bench overhead --rates 1000 --profile`)."""

    __slots__ = ("_gate", "_priority")

    def __init__(self, gate: PoolGate, priority: str) -> None:
        self._gate = gate
        self._priority = priority

    async def __aenter__(self) -> None:
        await self._gate.enter(self._priority)

    async def __aexit__(self, *exc: object) -> None:
        self._gate.leave()
