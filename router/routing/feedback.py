"""What workers report cached corrects the approximate index (and, unreported, its capacity).

Each answer's `usage.prompt_tokens_details.cached_tokens` is the truth about one prefix on one
worker. Fewer cached tokens than the index predicted means the worker evicted what the index
still listed; under LRU, everything that worker last used before the evicted entry went first,
so all of it is dropped. A worker that never reported its KV capacity (no
`vllm:cache_config_info`, metrics unreachable) starts at the configured default budget; each
eviction shrinks its budget to what the index still lists for it, and each prompt it held
beyond the index's belief (the budget evicted too early) grows the budget by a quarter, so the
budget converges on what the worker really holds. One answer at most halves it: a shortfall is
not always an eviction (the prefix may still be computing for another request). vLLM reports
`cached_tokens` as null both for 0 and when it runs without `--enable-prompt-tokens-details`:
null is 0 only for a worker that has reported a number before.
"""

from __future__ import annotations

from router.domain.policy import Outcome
from router.domain.worker import Worker
from router.routing.prefix_index import PrefixIndex

_BLOCK_TOKENS = 16
_GROWTH = 1.25


class CacheFeedback:
    def __init__(self, index: PrefixIndex) -> None:
        self._index = index
        self._reports_numbers: set[str] = set()
        self.evictions_seen = 0
        """Answers that showed the index listed more than the worker held (for tests, stats)."""

    def observe(self, worker: Worker, outcome: Outcome) -> None:
        cached = outcome.cached_tokens
        if cached is None:
            if worker.id not in self._reports_numbers:
                return
            cached = 0
        else:
            self._reports_numbers.add(worker.id)
        index = self._index
        decision = outcome.decision
        predicted = decision.matched_tokens
        tolerance = 2 * _BLOCK_TOKENS + predicted // 8
        learned = not worker.capacity_blocks
        if cached + tolerance < predicted:
            if decision.matched_pending:
                return  # still being computed for the request that indexed it, maybe
            self.evictions_seen += 1
            index.drop_older(worker.id, decision.index_stamp)
            if learned:
                # At most halved by one answer: a prefix still being computed for a request in
                # flight reads as evicted too, and early on the index lists far less than the
                # worker holds (shrinking to that, budgets fell to a tenth of the real capacity
                # on Mooncake's conversation trace and never grew back).
                floor = index.blocks_at(len(decision.block_keys or ())) + 1
                halved = index.budget_of(worker.id) // 2
                index.set_capacity(worker.id, max(floor, index.blocks_of(worker.id), halved))
        elif learned and cached > predicted + tolerance:
            grown = int(index.budget_of(worker.id) * _GROWTH) + 1
            index.set_capacity(worker.id, min(index.config.default_capacity_blocks, grown))

    def forget(self, worker_id: str) -> None:
        self._reports_numbers.discard(worker_id)
