"""Round robin: each pick takes the next candidate in turn."""

from __future__ import annotations

from collections.abc import Sequence

from router.domain.policy import Decision, Outcome, RoutingRequest
from router.domain.worker import Worker


class RoundRobin:
    name = "round_robin"
    indexes_answers = False

    def __init__(self) -> None:
        self._counter = 0

    def pick(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Decision:
        worker = candidates[self._counter % len(candidates)]
        self._counter += 1
        return Decision(worker=worker, reason="round_robin")

    def observe(self, outcome: Outcome) -> None:
        return None

    def forget_worker(self, worker: Worker) -> None:
        return None
