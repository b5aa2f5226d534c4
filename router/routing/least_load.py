"""Least load: the worker with the fewest requests, ties broken at random (and the decode step
of P/D pools, which weighs running sequences and KV use).

Load is the gateway's fresh `in_flight` plus the worker's reported `waiting` queue (which also
counts other gateways' requests). Random ties matter at low concurrency, where first-index
tie-breaks send everything to one worker (routing-landscape §8.1).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from router.domain.policy import Decision, Outcome, RoutingRequest
from router.domain.worker import Worker


def least_loaded(candidates: Sequence[Worker], rng: random.Random) -> Worker:
    loads = [w.in_flight + w.reported.waiting for w in candidates]
    low = min(loads)
    ties = [w for w, load in zip(candidates, loads, strict=True) if load == low]
    return ties[0] if len(ties) == 1 else rng.choice(ties)


class LeastLoad:
    name = "least_load"
    indexes_answers = False

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Decision:
        return Decision(worker=least_loaded(candidates, self._rng), reason="least_load")

    def observe(self, outcome: Outcome) -> None:
        return None

    def forget_worker(self, worker: Worker) -> None:
        return None


class DecodeLoad:
    """The decode step of a P/D pool: the prompt's KV arrives from the prefill worker, so the
    cache does not matter; load does. Fewest sequences running (the worker's report or the
    gateway's own count, the larger), then the least KV in use, ties at random."""

    name = "decode_load"
    indexes_answers = False

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Decision:
        def load(w: Worker) -> tuple[int, float]:
            reported = w.reported
            return max(reported.running + reported.waiting, w.fleet_in_flight), reported.kv_usage

        loads = [load(w) for w in candidates]
        low = min(loads)
        ties = [w for w, value in zip(candidates, loads, strict=True) if value == low]
        worker = ties[0] if len(ties) == 1 else self._rng.choice(ties)
        return Decision(worker=worker, reason="decode_load")

    def observe(self, outcome: Outcome) -> None:
        return None

    def forget_worker(self, worker: Worker) -> None:
        return None
