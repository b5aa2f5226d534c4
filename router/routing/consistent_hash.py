"""Consistent hashing with bounded load: a session (or a prompt's first block) -> one worker.

The affinity key is the session id when the client gives one, else the first `block_chars`
characters of the routing key (the system prompt's start). Keys and workers (each with
`virtual_nodes` points) sit on a 64-bit ring hashed with BLAKE2b, so every gateway replica and
every restart agrees, and a worker joining or leaving moves only ~1/N of the keys. Bounded load
(Mirrokni et al.): walking clockwise, skip any worker already at ceil(mean in-flight x
load_factor), counting this request, so a hot key spills over instead of piling up.
"""

from __future__ import annotations

import hashlib
import math
from bisect import bisect_right
from collections.abc import Sequence

from router.config import ConsistentHashPolicy, IndexConfig
from router.domain.policy import Decision, Outcome, RoutingRequest
from router.domain.worker import Worker


def stable_hash64(text: str) -> int:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class ConsistentHash:
    name = "consistent_hash"
    indexes_answers = False

    def __init__(self, config: ConsistentHashPolicy, index_config: IndexConfig) -> None:
        self._virtual_nodes = config.virtual_nodes
        self._load_factor = config.load_factor
        self._block_chars = index_config.block_chars
        # One ring, rebuilt only when the candidate set changes (health flips are rare).
        self._ring_ids: frozenset[str] = frozenset()
        self._points: list[int] = []
        self._owners: list[str] = []

    def pick(self, request: RoutingRequest, candidates: Sequence[Worker]) -> Decision:
        by_id = {w.id: w for w in candidates}
        if frozenset(by_id) != self._ring_ids:
            self._build_ring(by_id)
        affinity = request.session_id or request.key[: self._block_chars]
        total = sum(w.in_flight for w in candidates) + 1
        bound = math.ceil(total / len(candidates) * self._load_factor)
        start = bisect_right(self._points, stable_hash64(affinity))
        seen: set[str] = set()
        n = len(self._points)
        for step in range(n):
            worker_id = self._owners[(start + step) % n]
            if worker_id in seen:
                continue
            seen.add(worker_id)
            worker = by_id[worker_id]
            if worker.in_flight + 1 <= bound:
                return Decision(worker=worker, reason="hash_ring" if len(seen) == 1 else "spill")
            if len(seen) == len(by_id):
                break
        # Unreachable with load_factor >= 1 (someone is at or below the mean); stay total.
        return Decision(worker=min(candidates, key=lambda w: w.in_flight), reason="spill")

    def _build_ring(self, by_id: dict[str, Worker]) -> None:
        points = sorted(
            (stable_hash64(f"{worker_id}#{i}"), worker_id)
            for worker_id in by_id
            for i in range(self._virtual_nodes)
        )
        self._points = [p for p, _ in points]
        self._owners = [w for _, w in points]
        self._ring_ids = frozenset(by_id)

    def observe(self, outcome: Outcome) -> None:
        return None

    def forget_worker(self, worker: Worker) -> None:
        # The ring is rebuilt from the next pick's candidates; nothing is keyed by worker here.
        return None
