"""Requests each worker was given lately, decayed exponentially: the load a placement brings.

In-flight counts say how busy a worker is this millisecond; a placement decision (a session's
first turn, a cold prompt, a prefix that may be copied) decides where work goes for the next
seconds, because a session's later turns and a prefix's later requests follow it. Each worker's
count decays with time constant `tau_s`, so a steady rate of r requests per second reads as
about r * tau_s. State is one float pair per worker, updated in O(1) when read or added to.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class RecentLoad:
    def __init__(self, tau_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._tau_s = tau_s
        self._clock = clock
        self._counts: dict[str, tuple[float, float]] = {}

    def now(self) -> float:
        return self._clock()

    def value(self, worker_id: str, now: float) -> float:
        entry = self._counts.get(worker_id)
        if entry is None:
            return 0.0
        count, at = entry
        return count * math.exp((at - now) / self._tau_s)

    def add(self, worker_id: str, now: float) -> None:
        self._counts[worker_id] = (self.value(worker_id, now) + 1.0, now)

    def forget(self, worker_id: str) -> None:
        self._counts.pop(worker_id, None)
