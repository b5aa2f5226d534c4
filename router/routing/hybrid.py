"""The default policy: rank candidates by estimated time to first token, keep affinity cheap.

Each candidate's TTFT is estimated by `CostModel` from the queue ahead of the request, the
request's *uncached* tokens on that worker (prompt minus what the prefix index says it holds)
and the decode load. Cache hits shrink the second term and queues grow the first, so affinity
wins exactly until the cached worker is slower than a cold one: no gate that fires for every
request or never (routing-landscape §8-9). Ties (within a microsecond) go to the worker whose
index holds the fewest blocks, then at random, so distinct cold prompts spread over every
worker. A session sticks to its last worker while that worker's estimate is within
`session_margin_s` of the best. The chosen worker's blocks are
inserted at pick time, so concurrent requests sharing the prefix follow it at once.
In a precise pool (`request.block_hashes` set) the cached tokens come from the `PreciseIndex`
(vLLM's block hashes, confirmed by KV events) and the pick speculates the chosen worker's blocks.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import NamedTuple

from router.config import HybridPolicy, IndexConfig
from router.routing.cost_model import CostModel
from router.routing.policy import Decision, Outcome, RoutingRequest
from router.routing.precise_index import PreciseIndex
from router.routing.prefix_index import PrefixIndex
from router.routing.sessions import SessionTable
from router.upstream.worker import Worker

_TIE_S = 1e-6


class Estimate(NamedTuple):
    block_keys: list[int]
    cached_tokens: list[int]
    ttft_s: list[float]


class HybridCost:
    name = "hybrid"

    def __init__(
        self,
        config: HybridPolicy,
        index_config: IndexConfig,
        rng: random.Random | None = None,
        precise: PreciseIndex | None = None,
    ) -> None:
        self._config = config
        self.precise = precise
        self.cost_model = CostModel(config)
        self.index = PrefixIndex(index_config)
        self.sessions = SessionTable(config.session_max_entries, config.session_ttl_s)
        self._rng = rng or random.Random()

    def estimate(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Estimate:
        """Key blocks, cached tokens and estimated TTFT per candidate (the decision's cost)."""
        if self.precise is not None and request.block_hashes is not None:
            return self._estimate_precise(request, candidates, self.precise, request.block_hashes)
        index = self.index
        index.sync_capacities(candidates)
        keys = index.block_keys(request.key)
        matched = index.match(keys) if keys else {}
        prompt_tokens = request.prompt_tokens
        cached = [index.tokens_of(matched.get(w.id, 0), prompt_tokens) for w in candidates]
        ttft = self.cost_model.ttft_s
        costs = [ttft(w, prompt_tokens - c) for w, c in zip(candidates, cached, strict=True)]
        return Estimate(keys, cached, costs)

    def _estimate_precise(
        self,
        request: RoutingRequest,
        candidates: Sequence[Worker],
        precise: PreciseIndex,
        hashes: list[int],
    ) -> Estimate:
        precise.sync_capacities(candidates)
        held = precise.match(hashes)
        prompt_tokens = request.prompt_tokens
        cached = [precise.cached_tokens(held.get(w.id, 0), prompt_tokens) for w in candidates]
        ttft = self.cost_model.ttft_s
        costs = [ttft(w, prompt_tokens - c) for w, c in zip(candidates, cached, strict=True)]
        return Estimate([], cached, costs)  # no approximate keys: events tell other replicas

    def _affine(self, cached: list[int], costs: list[float], best: float) -> int:
        """The worker holding the most of the prompt, if its estimate is near the best.

        A near tie between a worker holding the prefix and a cold one (typically while the
        holder is still computing that prefix for an earlier request) is no tie: the cold
        choice makes a second copy of the prefix, costing cache space elsewhere. Only for
        requests without a session: a session's first turn places all its later turns, so
        there spreading load (the estimate's balance term) must keep its full weight.
        Returns -1 when nobody near the best holds anything."""
        near = [i for i, cost in enumerate(costs) if cost <= best + self._config.affinity_margin_s]
        most = max(cached[i] for i in near)
        if most <= 0:
            return -1
        holders = [i for i in near if cached[i] == most]
        low = min(costs[i] for i in holders)
        holders = [i for i in holders if costs[i] <= low + _TIE_S]
        return holders[0] if len(holders) == 1 else self._rng.choice(holders)

    def pick(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Decision:
        keys, cached, costs = self.estimate(request, candidates)
        precise = self.precise if request.block_hashes is not None else None
        best = min(costs)

        chosen = -1
        reason = ""
        session_id = request.session_id
        if session_id is not None:
            sticky_id = request.session_worker or self.sessions.get(session_id)
            if sticky_id is not None:
                for i, w in enumerate(candidates):
                    if w.id == sticky_id and costs[i] <= best + self._config.session_margin_s:
                        chosen, reason = i, "sticky"
                        break
        if chosen < 0 and session_id is None:
            chosen = self._affine(cached, costs, best)
            reason = "prefix_hit" if chosen >= 0 else ""
        if chosen < 0:
            ties = [i for i, cost in enumerate(costs) if cost <= best + _TIE_S]
            if len(ties) > 1:
                # Equal estimates (typically idle workers and a cold prompt): the worker caching
                # least goes first, so distinct shared prefixes land on distinct workers.
                held = [(precise or self.index).blocks_of(candidates[i].id) for i in ties]
                ties = [i for i, h in zip(ties, held, strict=True) if h == min(held)]
            chosen = ties[0] if len(ties) == 1 else self._rng.choice(ties)
            if cached[chosen]:
                reason = "prefix_hit"
            elif any(cached):
                reason = "spill"  # a worker holds part of the prompt but is slower
            else:
                reason = "cold"
        worker = candidates[chosen]
        if precise is not None and request.block_hashes is not None:
            precise.speculate(worker.id, request.block_hashes)
        else:
            self.index.insert(worker.id, keys)
        if session_id is not None:
            self.sessions.put(session_id, worker.id)
        return Decision(
            worker=worker, reason=reason, matched_tokens=cached[chosen], block_keys=keys
        )

    def observe(self, outcome: Outcome) -> None:
        # The pick-time insert already records the served prompt (a served request leaves it
        # cached), and sessions were updated at pick time; nothing more to learn yet.
        return None

    def forget_worker(self, worker: Worker) -> None:
        self.index.remove_worker(worker.id)
        if self.precise is not None:
            self.precise.remove_worker(worker.id)
        self.sessions.forget_worker(worker.id)
