"""The precise index: confirmed blocks from events, speculative ones that expire, bounds."""

from __future__ import annotations

import random

from router.config import HybridPolicy, IndexConfig
from router.domain.policy import RoutingRequest
from router.domain.worker import Health, Worker
from router.routing.hybrid import HybridCost
from router.routing.precise_index import PreciseIndex


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _index(ttl_s: float = 5.0, capacity: int = 1000) -> tuple[PreciseIndex, FakeClock]:
    clock = FakeClock()
    return PreciseIndex(16, ttl_s, capacity, clock=clock), clock


def test_match_counts_leading_blocks_per_worker() -> None:
    index, _ = _index()
    index.apply("a", "stored", [1, 2, 3, 4])
    index.apply("b", "stored", [1, 2])
    index.apply("c", "stored", [2, 3, 4])  # holds later blocks but not the first: no prefix
    assert index.match([1, 2, 3, 9]) == {"a": 3, "b": 2}
    assert index.match([1, 2, 3, 4]) == {"a": 4, "b": 2}
    assert index.match([9, 1]) == {}
    assert index.match([]) == {}


def test_removed_and_cleared() -> None:
    index, _ = _index()
    index.apply("a", "stored", [1, 2, 3])
    index.apply("b", "stored", [1, 2, 3])
    index.apply("a", "removed", [2])
    assert index.match([1, 2, 3]) == {"a": 1, "b": 3}
    index.apply("b", "cleared")
    assert index.match([1, 2, 3]) == {"a": 1}
    index.apply("a", "removed", [42])  # a block it never held: nothing happens
    assert index.confirmed_of("a") == {1, 3}


def test_speculative_entries_expire_unless_confirmed() -> None:
    index, clock = _index(ttl_s=5.0)
    index.speculate("a", [1, 2, 3])
    assert index.match([1, 2, 3]) == {"a": 3}
    index.apply("a", "stored", [1])  # the event confirms the first block only
    clock.now += 4.0
    index.speculate("b", [1])
    clock.now += 1.5  # a's speculation is 5.5 s old, b's 1.5 s
    assert index.match([1, 2, 3]) == {"a": 1, "b": 1}
    assert not index.holds("a", 2) and index.holds("a", 1)
    clock.now += 10
    assert index.match([1, 2]) == {"a": 1}
    assert index.blocks_of("b") == 0


def test_respeculating_refreshes_the_expiry() -> None:
    index, clock = _index(ttl_s=5.0)
    index.speculate("a", [1, 2])
    clock.now += 4
    index.speculate("a", [1])
    clock.now += 2
    assert index.match([1, 2]) == {"a": 1}


def test_removed_drops_a_speculative_entry_and_clear_drops_all() -> None:
    index, _ = _index()
    index.speculate("a", [1, 2])
    index.apply("a", "removed", [2])
    assert index.match([1, 2]) == {"a": 1}
    index.apply("a", "cleared")
    assert index.match([1, 2]) == {}


def test_each_worker_is_bounded_by_its_capacity() -> None:
    index, _ = _index(capacity=1000)
    worker = Worker(id="a", url="http://a", pool="p", kv_capacity_blocks=3)
    index.sync_capacities([worker])
    index.apply("a", "stored", [1, 2, 3, 4, 5])
    assert index.confirmed_of("a") == {3, 4, 5}  # oldest stored go first
    index.speculate("a", [10, 11, 12, 13])
    assert index.blocks_of("a") == 6
    assert index.match([10]) == {} and index.match([11, 12, 13]) == {"a": 3}


def test_snapshot_replaces_confirmed_blocks_and_remove_worker_frees_its_slot() -> None:
    index, _ = _index()
    index.apply("a", "stored", [1, 2])
    index.speculate("a", [7])
    index.load_snapshot("a", [2, 3])
    assert index.confirmed_of("a") == {2, 3} and index.holds("a", 7)
    index.remove_worker("a")
    assert index.match([2]) == {} and index.workers() == []
    index.apply("b", "stored", [2])
    assert index.match([2]) == {"b": 1}


def test_cached_tokens_mirror_vllm_caps() -> None:
    index, _ = _index()
    assert index.cached_tokens(2, 32) == 16  # a fully cached 32-token prompt reports 16
    assert index.cached_tokens(2, 33) == 32
    assert index.cached_tokens(5, 40) == 32
    assert index.cached_tokens(0, 40) == 0


def _worker(name: str) -> Worker:
    worker = Worker(id=name, url=f"http://{name}", pool="p")
    worker.health = Health.HEALTHY
    return worker


def test_hybrid_routes_on_the_precise_index_and_speculates_its_pick() -> None:
    index, _ = _index()
    policy = HybridCost(HybridPolicy(), IndexConfig(), random.Random(1), index)
    workers = [_worker("a"), _worker("b"), _worker("c")]
    hashes = list(range(1, 21))
    index.apply("b", "stored", hashes[:10])
    request = RoutingRequest(model="p", key="x", prompt_tokens=330, max_tokens=8)
    request.block_hashes = hashes
    decision = policy.pick(request, workers)
    assert decision.worker.id == "b" and decision.reason == "prefix_hit"
    assert decision.matched_tokens == 160 and not decision.block_keys
    assert index.match(hashes) == {"b": 20}  # the pick speculated the rest of the prompt
    policy.forget_worker(workers[1])
    assert index.match(hashes) == {}


def test_memoized_block_hashes_equal_the_plain_chain() -> None:
    import random

    from router.config import PreciseConfig
    from router.routing.precise_key import PreciseKeyer
    from router.vllm_wire.block_hash import block_hashes, to_event_int

    rng = random.Random(5)
    for algo in ("sha256", "sha256_cbor"):
        keyer = PreciseKeyer(PreciseConfig(tokenizer="word", hash_algo=algo))
        for salt, lora in ((None, None), ("tenant-a", None), ("s", ("sql", "/a/sql"))):
            for n in (0, 15, 16, 33, 400):
                tokens = [rng.randrange(50_000) for _ in range(n)]
                digests = block_hashes(tokens, 16, algo, cache_salt=salt, lora=lora)
                plain = [to_event_int(d) for d in digests]
                assert keyer._hashes(tokens, salt, lora) == plain  # computed
                assert keyer._hashes(tokens, salt, lora) == plain  # from the memo
