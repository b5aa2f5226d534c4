"""The simulated worker's prefix cache: vLLM's hit counting, pinning, LRU order and capacity."""

from __future__ import annotations

from router.vllm_wire.block_hash import block_hashes
from workers.sim.cache import BlocksRemoved, BlocksStored, EventExtras, PrefixCache, SeqBlocks

B = 16


class RecordingListener:
    def __init__(self) -> None:
        self.stored: list[BlocksStored] = []
        self.removed: list[bytes] = []
        self.cleared = 0
        self.steps = 0

    def blocks_stored(self, event: BlocksStored) -> None:
        self.stored.append(event)

    def blocks_removed(self, event: BlocksRemoved) -> None:
        self.removed.extend(event.block_hashes)

    def all_blocks_cleared(self) -> None:
        self.cleared += 1

    def step_finished(self) -> None:
        self.steps += 1


def tokens(n: int, base: int = 0) -> list[int]:
    return list(range(base, base + n))


def run_to_completion(
    cache: PrefixCache, toks: list[int], max_tokens: int = 1, salt: str | None = None
) -> tuple[SeqBlocks, int]:
    """Admit, compute and commit the whole prompt, then free it; return (blocks, hit tokens)."""
    hashes = block_hashes(toks, B, cache_salt=salt)
    seq = cache.allocate(hashes, len(toks), len(toks) + max_tokens)
    assert seq is not None
    hit_tokens = seq.num_hit_blocks * B
    cache.commit(seq, hashes, toks, len(toks), EventExtras(salt))
    cache.free(seq)
    return seq, hit_tokens


def test_hits_are_whole_blocks_capped_below_prompt_length() -> None:
    cache = PrefixCache(64, B)
    run_to_completion(cache, tokens(48))
    # A fully cached prompt still recomputes its last token: 48 tokens -> 2 blocks hit.
    assert run_to_completion(cache, tokens(48))[1] == 32
    # The reference example: a fully cached 32-token prompt reports 16.
    assert run_to_completion(cache, tokens(32))[1] == 16
    # One more token than two blocks: both blocks hit.
    assert run_to_completion(cache, tokens(33))[1] == 32
    # A partial block never counts.
    assert run_to_completion(cache, tokens(15))[1] == 0
    # Divergence in block 1 stops the hit after block 0.
    changed = tokens(48)
    changed[20] = 999
    assert run_to_completion(cache, changed)[1] == 16


def test_count_hit_blocks_matches_allocate() -> None:
    cache = PrefixCache(64, B)
    toks = tokens(80)
    run_to_completion(cache, toks)
    hashes = block_hashes(toks)
    assert cache.count_hit_blocks(hashes, 80) == 4  # (80 - 1) // 16
    assert cache.count_hit_blocks(hashes, 81) == 5


def test_cache_salt_isolates_prefixes() -> None:
    cache = PrefixCache(64, B)
    run_to_completion(cache, tokens(48), salt="tenant-a")
    assert run_to_completion(cache, tokens(48), salt="tenant-b")[1] == 0
    assert run_to_completion(cache, tokens(48), salt="tenant-a")[1] == 32
    assert run_to_completion(cache, tokens(48))[1] == 0


def test_pinned_blocks_are_never_evicted() -> None:
    cache = PrefixCache(4, B)
    a = tokens(64)
    ha = block_hashes(a)
    seq_a = cache.allocate(ha, 64, 64)
    assert seq_a is not None
    cache.commit(seq_a, ha, a, 64)
    assert cache.free_blocks == 0 and cache.usage == 1.0
    # Nothing is free: another prompt cannot be admitted while A runs...
    b = tokens(32, base=1000)
    assert cache.allocate(block_hashes(b), 32, 33) is None
    # ...but a prompt sharing A's prefix shares its pinned blocks and needs only new ones.
    assert cache.allocate(ha[:2], 33, 33) is None  # needs 1 more block, none free
    cache.free(seq_a)
    assert cache.free_blocks == 4 and cache.cached_blocks == 4
    seq_b = cache.allocate(block_hashes(b), 32, 33)
    assert seq_b is not None
    assert cache.cached_blocks == 1  # three of A's blocks were evicted for B


def test_shared_prefix_is_pinned_by_both_sequences() -> None:
    cache = PrefixCache(8, B)
    toks = tokens(48)
    hashes = block_hashes(toks)
    first = cache.allocate(hashes, 48, 48)
    assert first is not None
    cache.commit(first, hashes, toks, 48)
    second = cache.allocate(hashes, 48, 48)
    assert second is not None and second.num_hit_blocks == 2
    assert cache.free_blocks == 8 - 4  # 3 for the first, 1 new for the second
    cache.free(first)
    # The shared blocks are still referenced by the second sequence.
    assert cache.free_blocks == 8 - 3
    cache.free(second)
    assert cache.free_blocks == 8


def test_lru_evicts_oldest_chain_tail_first() -> None:
    listener = RecordingListener()
    cache = PrefixCache(6, B, [listener])
    a, b = tokens(48), tokens(48, base=500)
    ha, hb = block_hashes(a), block_hashes(b)
    run_to_completion(cache, a, max_tokens=0)
    run_to_completion(cache, b, max_tokens=0)
    # Freed tail first, appended: A's deepest block is the first to go.
    assert cache.eviction_order() == [ha[2], ha[1], ha[0], hb[2], hb[1], hb[0]]
    c = tokens(32, base=900)
    seq = cache.allocate(block_hashes(c), 32, 32)
    assert seq is not None
    assert listener.removed == [ha[2], ha[1]]
    assert cache.count_hit_blocks(ha, 49) == 1
    assert cache.count_hit_blocks(hb, 49) == 3


def test_hit_refreshes_recency() -> None:
    cache = PrefixCache(4, B)
    a, b = tokens(32), tokens(32, base=500)
    run_to_completion(cache, a, max_tokens=0)
    run_to_completion(cache, b, max_tokens=0)
    # Re-using A's first block moves it behind B's blocks in the eviction order.
    run_to_completion(cache, a[:17], max_tokens=0)
    order = cache.eviction_order()
    assert order[-1] == block_hashes(a)[0]


def test_unhashed_blocks_are_reused_before_cached_ones() -> None:
    cache = PrefixCache(4, B)
    a = tokens(32)
    run_to_completion(cache, a, max_tokens=0)  # 2 cached blocks
    scratch = cache.allocate([], 5, 20)  # 2 blocks that never get a hash
    assert scratch is not None
    cache.free(scratch)
    seq = cache.allocate([], 5, 20)
    assert seq is not None
    assert cache.cached_blocks == 2  # the scratch blocks were reused, A survived


def test_capacity_and_usage() -> None:
    cache = PrefixCache(10, B)
    assert cache.blocks_needed(161) == 11
    assert cache.allocate([], 100, 161) is None
    seq = cache.allocate([], 100, 160)
    assert seq is not None and cache.usage == 1.0
    cache.free(seq)
    assert cache.usage == 0.0


def test_stored_events_carry_parent_tokens_and_salt() -> None:
    listener = RecordingListener()
    cache = PrefixCache(16, B, [listener])
    toks = tokens(64)
    hashes = block_hashes(toks, cache_salt="s")
    seq = cache.allocate(hashes, 64, 65)
    assert seq is not None
    cache.commit(seq, hashes, toks, 20, EventExtras("s"))  # chunked prefill: one full block so far
    cache.commit(seq, hashes, toks, 64, EventExtras("s"))
    first, second = listener.stored
    assert first.block_hashes == (hashes[0],) and first.parent_block_hash is None
    assert first.token_ids == tuple(toks[:16]) and first.extra_keys == (("s",),)
    assert second.block_hashes == tuple(hashes[1:4]) and second.parent_block_hash == hashes[0]
    assert second.token_ids == tuple(toks[16:64]) and second.extra_keys is None
    # A second sequence that only hits produces no new stored event.
    cache.free(seq)
    again = cache.allocate(hashes, 64, 65)
    assert again is not None
    cache.commit(again, hashes, toks, 64, EventExtras("s"))
    assert len(listener.stored) == 2


def test_concurrent_twins_register_once() -> None:
    listener = RecordingListener()
    cache = PrefixCache(16, B, [listener])
    toks = tokens(32)
    hashes = block_hashes(toks)
    one = cache.allocate(hashes, 32, 33)
    two = cache.allocate(hashes, 32, 33)
    assert one is not None and two is not None and two.num_hit_blocks == 0
    cache.commit(one, hashes, toks, 32)
    cache.commit(two, hashes, toks, 32)
    assert len(listener.stored) == 1 and cache.cached_blocks == 2
    cache.free(one)
    cache.free(two)
    assert cache.free_blocks == 16 and cache.cached_blocks == 2


def test_reset_clears_everything_and_notifies() -> None:
    listener = RecordingListener()
    cache = PrefixCache(8, B, [listener])
    run_to_completion(cache, tokens(48))
    assert cache.cached_blocks == 3
    cache.reset()
    cache.end_step()
    assert cache.cached_blocks == 0 and listener.cleared == 1 and listener.steps == 1
    assert run_to_completion(cache, tokens(48))[1] == 0


def test_stored_events_carry_the_adapter_on_every_block() -> None:
    listener = RecordingListener()
    cache = PrefixCache(16, B, [listener])
    toks = tokens(48)
    lora = ("sql-lora", "/adapters/sql")
    hashes = block_hashes(toks, cache_salt="s", lora=lora)
    assert hashes != block_hashes(toks, cache_salt="s")  # the adapter changes every hash
    seq = cache.allocate(hashes, 48, 49)
    assert seq is not None
    cache.commit(seq, hashes, toks, 48, EventExtras("s", "sql-lora"))
    (event,) = listener.stored
    assert event.lora_name == "sql-lora"
    assert event.extra_keys == (("sql-lora", "s"), ("sql-lora",), ("sql-lora",))
