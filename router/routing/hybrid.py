"""The default policy: rank candidates by estimated time to first token, keep affinity cheap.

Each candidate's TTFT is estimated by `CostModel` from the queue ahead of the request, the
request's *uncached* tokens on that worker (prompt minus what the prefix index says it holds)
and the decode load, at the worker's own learned prefill rate and decode cost. Cache hits
shrink the second term and queues grow the first, so affinity wins exactly until the cached
worker is slower than a cold one (for a prefix one worker alone holds, slower by more than the
prefill a copy computes again, `copy_weight`): no gate that fires for every request or never
(routing-landscape §8-9). Ties (within a microsecond) go where the new blocks evict the least
valuable ones (a worker with room first, then the one whose least recently used entry is
oldest), then to the worker holding the fewest blocks, then at random, so distinct cold prompts
spread over every worker and a one-off prompt does not push out a hot prefix. A session sticks
to its last worker while that worker's estimate is within `session_margin_s` of the best. The
chosen worker's blocks are inserted at pick time, so concurrent requests sharing the prefix
follow it at once (without making room yet, and withdrawn if the worker refuses the request or
fails before answering: a refused prompt must not push out what the worker holds); when the
answer ends, the prompt plus the answer's text is inserted (vLLM
caches generated tokens too, so the next turn matches its whole history), and the cached tokens
the worker reported correct the index (`CacheFeedback`).
In a precise pool (`request.block_hashes` set) the cached tokens come from the `PreciseIndex`
(vLLM's block hashes, confirmed by KV events) and the pick speculates the chosen worker's blocks.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import NamedTuple

from router.config import HybridPolicy, IndexConfig
from router.domain.calibration import TokenCalibration
from router.domain.policy import Decision, Outcome, RoutingRequest
from router.domain.worker import Worker
from router.routing.cost_model import CostModel
from router.routing.feedback import CacheFeedback
from router.routing.peer_backlog import PeerBacklog
from router.routing.precise_index import PreciseIndex
from router.routing.prefix_index import PrefixIndex
from router.routing.recent_load import RecentLoad
from router.routing.sessions import SessionTable

_TIE_S = 1e-6
_MAX_PENDING = 1 << 16
"""Picks remembered as waiting for their answer (an outcome never reported is forgotten)."""


class Estimate(NamedTuple):
    block_keys: list[int]
    cached_tokens: list[int]
    ttft_s: list[float]
    matched_blocks: list[int]
    """Leading index blocks each candidate holds (approximate mode; zeros in precise)."""


class HybridCost:
    name = "hybrid"

    def __init__(
        self,
        config: HybridPolicy,
        index_config: IndexConfig,
        rng: random.Random | None = None,
        precise: PreciseIndex | None = None,
        calibration: TokenCalibration | None = None,
    ) -> None:
        self._config = config
        self.precise = precise
        self.indexes_answers = precise is None  # precise pools hear of output blocks by events
        self.cost_model = CostModel(config)
        self.index = PrefixIndex(index_config, calibration)
        self.feedback = CacheFeedback(self.index)
        self.recent = RecentLoad(config.recent_window_s)
        self.sessions = SessionTable(config.session_max_entries, config.session_ttl_s)
        self._rng = rng or random.Random()
        self.peer_backlog = PeerBacklog()
        self._pending: dict[int, None] = {}
        """Stamps of the picks' inserts whose outcome has not come (insertion-ordered)."""

    def estimate(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Estimate:
        """Key blocks, cached tokens and estimated TTFT per candidate (the decision's cost)."""
        if self.precise is not None and request.block_hashes is not None:
            return self._estimate_precise(request, candidates, self.precise, request.block_hashes)
        index = self.index
        index.sync_capacities(candidates)
        keys = index.block_keys(request.key, request.partition)
        matched = index.match(keys) if keys else {}
        prompt_tokens = request.prompt_tokens
        blocks = [matched.get(w.id, 0) for w in candidates]
        cached = [index.tokens_of(b, prompt_tokens) for b in blocks]
        costs = self._costs(request, candidates, cached)
        return Estimate(keys, cached, costs, blocks)

    def cached_tokens(self, request: RoutingRequest, candidates: Sequence[Worker]) -> list[int]:
        return self.estimate(request, candidates).cached_tokens

    def _costs(
        self, request: RoutingRequest, candidates: Sequence[Worker], cached: list[int]
    ) -> list[float]:
        model = self.cost_model
        costs = model.ttft_all(
            candidates, request.prompt_tokens, cached, self._peer_backlogs(candidates)
        )
        adapter = request.adapter
        if adapter is not None:
            costs = [
                c + model.adapter_s(w, adapter) for w, c in zip(candidates, costs, strict=True)
            ]
        return costs

    def _peer_backlogs(self, candidates: Sequence[Worker]) -> list[float] | None:
        if not self.peer_backlog:
            return None  # one replica, or nothing heard of lately
        now = self.recent.now()
        return [self._peer_tokens(w.id, now) for w in candidates]

    def _peer_tokens(self, worker_id: str, now: float) -> float:
        """Other replicas' prefill left on the worker (`PeerBacklog`)."""
        if not self.peer_backlog:
            return 0.0
        return self.peer_backlog.tokens(worker_id, now, self.cost_model.rates.rate(worker_id))

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
        costs = self._costs(request, candidates, cached)
        # No approximate keys: KV events tell other replicas.
        return Estimate([], cached, costs, [0] * len(cached))

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

    def _with_copy_cost(
        self,
        candidates: Sequence[Worker],
        cached: list[int],
        costs: list[float],
        recent: tuple[list[float], float],
    ) -> list[float]:
        """Costs plus the prefill a choice computes a second time: the tokens the one worker
        holding the longest prefix has and this one does not (their prefill on this worker,
        times copy_weight).
        A TTFT estimate prices that prefill only as this request's wait; the GPU time and the
        cache space of the copy it omits. With long prompts the omission decides: a 10k-token
        history whose holder has one prefill queued looked cheaper copied to an idle worker,
        and copies pushed out other histories (Mooncake conversation trace, prompts of 8.3k
        tokens at the median: 17.7% hit with copy_weight 0, 19.2% with 0.5, 19.8% with 1,
        19.4% with 2). With shorter prompts copies matter less and spreading more: at 4 trace
        tokens a word and 12 characters per token 14.7% with 0, 15.3% with 0.5, 13.8% with 1;
        hence 0.5."""
        weight = self._config.copy_weight
        most = max(cached, default=0)
        if not weight or not most or cached.count(most) > 1:
            return costs  # held twice already: a shared prefix, whose copies spread its load
        # A holder given well above its share of the recent requests is a hot spot (a system
        # prompt many requests share): its copies are what spreads the load. Priced there too,
        # hot groups stayed on too few workers (mixed workload imbalance 1.39-1.43 against
        # 1.27-1.31, same hit rate). Exempting only prefixes many requests matched lately (not
        # a conversation's history, matched by its next turn alone) kept the histories where
        # they were and lost hits: Mooncake conversation trace 18.8% against 19.2% in one run.
        loads, ceiling = recent
        if loads[cached.index(most)] > ceiling:
            return costs
        rate = self.cost_model.rates.rate
        return [
            cost + weight * (most - held) / rate(w.id)
            for w, cost, held in zip(candidates, costs, cached, strict=True)
        ]

    def pick(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Decision:
        keys, cached, costs, blocks = self.estimate(request, candidates)
        now = self.recent.now()
        recent = self._recent_loads(candidates, now)
        if request.session_id is None:
            # A session's first turn places its later turns: spreading sessions keeps its weight.
            costs = self._with_copy_cost(candidates, cached, costs, recent)
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
        if chosen < 0:
            # A placement: it brings later work along, so the recent load counts too.
            costs = self._placement_costs(costs, recent)
            best = min(costs)
        if chosen < 0 and session_id is None:
            chosen = self._affine(cached, costs, best)
            reason = "prefix_hit" if chosen >= 0 else ""
        if chosen < 0:
            ties = [i for i, cost in enumerate(costs) if cost <= best + _TIE_S]
            if len(ties) > 1:
                ties = self._least_valuable_eviction(request, candidates, ties, precise)
            chosen = ties[0] if len(ties) == 1 else self._rng.choice(ties)
            if cached[chosen]:
                reason = "prefix_hit"
            elif any(cached):
                reason = "spill"  # a worker holds part of the prompt but is slower
            else:
                reason = "cold"
        worker = candidates[chosen]
        self.recent.add(worker.id, now)
        stamp = held = mine = 0
        if precise is not None and request.block_hashes is not None:
            precise.speculate(worker.id, request.block_hashes)
        else:
            index = self.index
            held = index.depth_of_blocks(blocks[chosen])
            stamp = index.stamp_at(worker.id, keys, held)
            index.insert(worker.id, keys, fit=False)  # fitted once the worker answers
            mine = self._remember_pending(index.stamp_at(worker.id, keys, len(keys)))
        if session_id is not None:
            self.sessions.put(session_id, worker.id)
        return Decision(
            worker=worker,
            reason=reason,
            matched_tokens=cached[chosen],
            block_keys=keys,
            index_stamp=stamp,
            matched_pending=stamp in self._pending,
            pick_stamp=mine,
            held_keys=held,
            backlog_tokens=worker.prefill_backlog_tokens + int(self._peer_tokens(worker.id, now)),
            running=max(worker.reported.running, worker.in_flight),
        )

    def _remember_pending(self, stamp: int) -> int:
        """Note a pick's insert as not yet answered (a prefix the worker may still be
        computing: a request matching it meanwhile gets fewer cached tokens than the index
        says, and that is no eviction)."""
        if stamp:
            pending = self._pending
            pending[stamp] = None
            if len(pending) > _MAX_PENDING:
                del pending[next(iter(pending))]
        return stamp

    def _placement_costs(
        self, costs: list[float], recent: tuple[list[float], float]
    ) -> list[float]:
        """Costs plus a price on recent load well above the candidates' mean: a soft cap on
        imbalance that leaves affinity alone while load is about even (a linear price on all
        recent load cost 2 points of hit rate on the trace, for balance nobody needed)."""
        per_request = self._config.placement_s_per_recent_request
        if not per_request or len(costs) < 2:
            return costs
        loads, ceiling = recent
        return [
            cost + per_request * max(0.0, load - ceiling)
            for load, cost in zip(loads, costs, strict=True)
        ]

    def _recent_loads(self, candidates: Sequence[Worker], now: float) -> tuple[list[float], float]:
        """Each candidate's recent requests, and the level above which a worker stands out
        (`placement_tolerance` above the candidates' mean)."""
        recent = self.recent.value
        loads = [recent(w.id, now) for w in candidates]
        return loads, (1 + self._config.placement_tolerance) * sum(loads) / len(loads)

    def _least_valuable_eviction(
        self,
        request: RoutingRequest,
        candidates: Sequence[Worker],
        ties: list[int],
        precise: PreciseIndex | None,
    ) -> list[int]:
        """Among equal estimates (typically idle workers and a cold prompt), the workers where
        this prompt's blocks push out the least: room first, then the oldest LRU entry; then
        the worker caching least, so distinct shared prefixes land on distinct workers."""
        if precise is None:
            index = self.index
            blocks = index.blocks_for_tokens(request.prompt_tokens)
            rank = {
                i: (
                    index.eviction_cost(candidates[i].id, blocks),
                    index.blocks_of(candidates[i].id),
                )
                for i in ties
            }
        else:
            rank = {i: (0, precise.blocks_of(candidates[i].id)) for i in ties}
        least = min(rank.values())
        return [i for i in ties if rank[i] == least]

    def observe(self, outcome: Outcome) -> None:
        """Learn from an answer: index its text, correct the index from the cached tokens the
        worker reported, and sample the worker's prefill rate (sessions and the prompt's own
        blocks were recorded at pick time)."""
        decision = outcome.decision
        self._pending.pop(decision.pick_stamp, None)
        if outcome.request.block_hashes is not None:
            return
        if not outcome.ok:
            if outcome.unanswered and decision.block_keys:
                self.index.withdraw(decision.worker.id, decision.block_keys, decision.held_keys)
            return
        worker = decision.worker
        self.feedback.observe(worker, outcome)
        index = self.index
        if outcome.answer_key is not None:
            keys = index.block_keys(outcome.answer_key, outcome.request.partition)
            index.insert(worker.id, keys)  # fitted: the room the pick's insert did not make
            if outcome.share_insert is not None:
                outcome.share_insert(worker.id, keys)
        else:
            index.fit(worker.id)  # the room the pick's insert did not make
        if outcome.ttft_s is not None:
            prompt = outcome.prompt_tokens or outcome.request.prompt_tokens
            cached = decision.matched_tokens
            if outcome.cached_tokens is not None:
                cached = outcome.cached_tokens
            self.cost_model.rates.observe(
                worker.id,
                decision.backlog_tokens + max(0, prompt - cached),
                decision.running,
                outcome.ttft_s,
            )

    @property
    def key_scheme(self) -> str:
        return self.index.key_scheme

    def apply_remote_insert(
        self, worker_id: str, block_keys: list[int], prefill_tokens: int = 0
    ) -> None:
        """Another replica's decision: the worker holds the prefix, and it was given a request
        (each replica dispatches only its share, so placement must count the others' too) with
        `prefill_tokens` to compute before its first token (queued ahead of ours now)."""
        self.index.insert(worker_id, block_keys)
        now = self.recent.now()
        self.recent.add(worker_id, now)
        rate = self.cost_model.rates.rate(worker_id)
        self.peer_backlog.add(worker_id, prefill_tokens, now, rate)

    def forget_worker(self, worker: Worker) -> None:
        self.cost_model.rates.forget(worker.id)
        self.recent.forget(worker.id)
        self.peer_backlog.forget(worker.id)
        self.feedback.forget(worker.id)
        self.index.remove_worker(worker.id)
        if self.precise is not None:
            self.precise.remove_worker(worker.id)
        self.sessions.forget_worker(worker.id)
