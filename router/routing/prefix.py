"""The SGLang `cache_aware` baseline (routing-landscape §1.1), the policy to beat.

Per request: if the pool is imbalanced (max - min in-flight > `balance_abs_threshold` and
max > min x `balance_rel_threshold`) take the least loaded worker; otherwise, if the best
match covers more than `cache_threshold` of the key's characters, take the best-matching
worker; otherwise the least loaded worker (current SGLang), ties broken by the smallest indexed
tree (older SGLang's fallback) and then at random. Either way the request's blocks are inserted
for the chosen worker, as SGLang does even in imbalanced mode. Load is the gateway's own
in-flight count, like SGLang's `worker.load()`. The only deliberate departure from SGLang:
remaining ties are broken at random rather than by list order (routing-landscape §8.1).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from router.config import IndexConfig, PrefixPolicy
from router.domain.calibration import TokenCalibration
from router.domain.policy import Decision, Outcome, RoutingRequest
from router.domain.worker import Worker
from router.routing.prefix_index import PrefixIndex


class PrefixAffinity:
    name = "prefix"
    indexes_answers = False

    def __init__(
        self,
        config: PrefixPolicy,
        index_config: IndexConfig,
        rng: random.Random | None = None,
        calibration: TokenCalibration | None = None,
    ) -> None:
        self._config = config
        self.index = PrefixIndex(index_config, calibration)
        self._rng = rng or random.Random()

    def pick(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Decision:
        index = self.index
        index.sync_capacities(candidates)
        keys = index.block_keys(request.key, request.partition)
        loads = [w.in_flight for w in candidates]
        high, low = max(loads), min(loads)
        cfg = self._config
        imbalanced = (
            high - low > cfg.balance_abs_threshold and high > low * cfg.balance_rel_threshold
        )
        matched = index.match(keys) if keys else {}
        if imbalanced:
            worker, reason = self._least_loaded(candidates), "imbalance"
        else:
            best = max((matched.get(w.id, 0) for w in candidates), default=0)
            rate = best * index.block_chars / max(1, len(request.key))
            if best and rate > cfg.cache_threshold:
                holders = [w for w in candidates if matched.get(w.id, 0) == best]
                worker, reason = self._least_loaded(holders), "prefix_hit"
            else:
                worker, reason = self._least_loaded(candidates), "least_load"
        index.insert(worker.id, keys)
        matched_tokens = index.tokens_of(matched.get(worker.id, 0), request.prompt_tokens)
        return Decision(worker=worker, reason=reason, matched_tokens=matched_tokens)

    def _least_loaded(self, workers: Sequence[Worker]) -> Worker:
        ranks = [(w.in_flight, self.index.blocks_of(w.id)) for w in workers]
        low = min(ranks)
        ties = [w for w, rank in zip(workers, ranks, strict=True) if rank == low]
        return ties[0] if len(ties) == 1 else self._rng.choice(ties)

    def observe(self, outcome: Outcome) -> None:
        # A served request leaves its prompt cached on the worker whatever it reported as
        # cached beforehand, so the pick-time insert already says everything an outcome could.
        return None

    @property
    def key_scheme(self) -> str:
        return self.index.key_scheme

    def apply_remote_insert(
        self, worker_id: str, block_keys: list[int], prefill_tokens: int = 0
    ) -> None:
        self.index.insert(worker_id, block_keys)

    def forget_worker(self, worker: Worker) -> None:
        self.index.remove_worker(worker.id)
