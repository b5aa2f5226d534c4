"""Prefill other gateway replicas dispatched to each worker, as this replica last heard of it.

A replica knows its own prefill backlog exactly (`Worker.prefill_backlog_tokens`: uncached tokens
dispatched and not yet answered); the others' reach it only through the worker's load report (a
count of waiting requests, up to a second old) and through their shared routing decisions, which
now carry the tokens each decision sends to be computed. Those tokens are kept per worker and
drained at the worker's prefill rate from the moment they were heard of (the worker computes its
queue at that rate, whoever sent it): a fluid estimate, never negative, that needs no word of
when the other replica's request got its first token.
"""

from __future__ import annotations


class PeerBacklog:
    def __init__(self) -> None:
        self._tokens: dict[str, tuple[float, float]] = {}

    def tokens(self, worker_id: str, now: float, rate: float) -> float:
        """What is left of the other replicas' prefill on this worker at `now`."""
        entry = self._tokens.get(worker_id)
        if entry is None:
            return 0.0
        tokens, at = entry
        left = tokens - rate * (now - at)
        if left <= 0:
            del self._tokens[worker_id]
            return 0.0
        return left

    def add(self, worker_id: str, tokens: int, now: float, rate: float) -> None:
        if tokens > 0:
            self._tokens[worker_id] = (self.tokens(worker_id, now, rate) + tokens, now)

    def __len__(self) -> int:
        """Workers with another replica's prefill heard of (0 behind one replica)."""
        return len(self._tokens)

    def forget(self, worker_id: str) -> None:
        self._tokens.pop(worker_id, None)
