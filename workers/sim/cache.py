"""Block-level prefix cache of the simulated worker, with vLLM's hit counting and LRU eviction.

The KV cache is a fixed pool of ``num_gpu_blocks`` physical blocks. A running sequence pins its
blocks (reference counts). A block whose tokens are fully computed is registered under its chained
block hash (``router.vllm_wire.block_hash``) and can then be shared by any later sequence with the
same prefix. Freed blocks go to one free queue, as in vLLM's ``FreeKVCacheBlockQueue``
(``reference/vllm-interface.md`` §2.6): a finished sequence's blocks are released tail first,
hashed ones appended to the back and unhashed ones pushed to the front, and allocation pops from
the front, evicting whatever hash a popped block still had. That yields LRU over cached blocks,
deeper blocks of a chain before their prefixes. Hits are whole leading blocks, capped so that at
least the prompt's last token is recomputed (§2.5). Two sequences computing the same prefix at the
same time keep separate blocks; only the first registers the hash (vLLM keeps both, which changes
nothing a router can observe but duplicate events). Listeners see every store, removal and clear,
which is where a KV-event publisher plugs in.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class BlocksStored:
    """A run of blocks of one sequence newly registered in the cache (vLLM ``BlockStored``)."""

    block_hashes: tuple[bytes, ...]
    parent_block_hash: bytes | None  # hash of the block before the first one; None at position 0
    token_ids: tuple[int, ...]
    block_size: int
    extra_keys: tuple[tuple[Any, ...] | None, ...] | None  # untagged, one per block, as events say
    lora_name: str | None = None


@dataclass(frozen=True, slots=True)
class EventExtras:
    """What a sequence's KV events say beyond its tokens: its salt and LoRA adapter."""

    cache_salt: str | None = None
    lora_name: str | None = None


@dataclass(frozen=True, slots=True)
class BlocksRemoved:
    """Cached blocks evicted to make room (vLLM emits one ``BlockRemoved`` per hash)."""

    block_hashes: tuple[bytes, ...]


class KVEventListener(Protocol):
    """Receives cache changes as they happen; ``step_finished`` marks an engine step's end.

    vLLM publishes the events of one engine step as one batch, so a publisher buffers until
    ``step_finished``. ``all_blocks_cleared`` happens outside steps (a reset).
    """

    def blocks_stored(self, event: BlocksStored) -> None: ...

    def blocks_removed(self, event: BlocksRemoved) -> None: ...

    def all_blocks_cleared(self) -> None: ...

    def step_finished(self) -> None: ...


class _Block:
    __slots__ = ("block_hash", "block_id", "ref_cnt")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: bytes | None = None


class SeqBlocks:
    """The physical blocks one sequence holds, in token order, and how many are registered."""

    __slots__ = ("blocks", "num_committed", "num_hit_blocks")

    def __init__(self, blocks: list[_Block], num_hit_blocks: int) -> None:
        self.blocks = blocks
        self.num_hit_blocks = num_hit_blocks
        self.num_committed = num_hit_blocks  # leading blocks whose hash has been handled


class PrefixCache:
    """Fixed-capacity block pool with a hash -> block map and an LRU free queue."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        listeners: Sequence[KVEventListener] = (),
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._listeners: list[KVEventListener] = list(listeners)
        # Free queue: front is allocated (and evicted) first. Insertion order is the queue order.
        self._free: OrderedDict[int, _Block] = OrderedDict(
            (i, _Block(i)) for i in range(num_blocks)
        )
        self._by_hash: dict[bytes, _Block] = {}

    # -- observation -----------------------------------------------------------------------

    def add_listener(self, listener: KVEventListener) -> None:
        self._listeners.append(listener)

    @property
    def free_blocks(self) -> int:
        """Blocks no sequence pins (cached-but-unused blocks count as free, as in vLLM)."""
        return len(self._free)

    @property
    def cached_blocks(self) -> int:
        """Blocks registered under a hash, pinned or not."""
        return len(self._by_hash)

    @property
    def usage(self) -> float:
        """vLLM's ``kv_cache_usage_perc``: the share of blocks held by live sequences."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def count_hit_blocks(self, hashes: Sequence[bytes], num_prompt_tokens: int) -> int:
        """Leading blocks of a prompt found in the cache, capped at ``(n - 1) // block_size``."""
        limit = min(len(hashes), (num_prompt_tokens - 1) // self.block_size)
        by_hash = self._by_hash
        hit = 0
        while hit < limit and hashes[hit] in by_hash:
            hit += 1
        return hit

    def contains(self, block_hash: bytes) -> bool:
        return block_hash in self._by_hash

    # -- sequence lifecycle ------------------------------------------------------------------

    def allocate(
        self, hashes: Sequence[bytes], num_prompt_tokens: int, num_total_tokens: int
    ) -> SeqBlocks | None:
        """Pin the cached prefix and reserve blocks for the rest; None if they do not fit now."""
        by_hash = self._by_hash
        hit = self.count_hit_blocks(hashes, num_prompt_tokens)
        hit_blocks = [by_hash[hashes[i]] for i in range(hit)]
        need = self.blocks_needed(num_total_tokens) - hit
        reusable = sum(1 for b in hit_blocks if b.ref_cnt == 0)  # these leave the free queue
        if need > len(self._free) - reusable:
            return None
        free = self._free
        for block in hit_blocks:
            if block.ref_cnt == 0:
                del free[block.block_id]
            block.ref_cnt += 1
        removed: list[bytes] = []
        new_blocks: list[_Block] = []
        for _ in range(need):
            _, block = free.popitem(last=False)
            if block.block_hash is not None:
                del by_hash[block.block_hash]
                removed.append(block.block_hash)
                block.block_hash = None
            block.ref_cnt = 1
            new_blocks.append(block)
        if removed and self._listeners:
            event = BlocksRemoved(tuple(removed))
            for listener in self._listeners:
                listener.blocks_removed(event)
        return SeqBlocks(hit_blocks + new_blocks, hit)

    def commit(
        self,
        seq: SeqBlocks,
        hashes: Sequence[bytes],
        tokens: Sequence[int],
        num_computed_tokens: int,
        extras: EventExtras | None = None,
    ) -> None:
        """Register the sequence's blocks that are now fully computed under their hashes."""
        upto = min(num_computed_tokens // self.block_size, len(hashes), len(seq.blocks))
        start = seq.num_committed
        if upto <= start:
            return
        by_hash = self._by_hash
        stored: list[int] = []  # block indexes newly registered by this call
        for index in range(start, upto):
            block_hash = hashes[index]
            if block_hash not in by_hash:  # a concurrent twin may have registered it first
                block = seq.blocks[index]
                block.block_hash = block_hash
                by_hash[block_hash] = block
                stored.append(index)
        seq.num_committed = upto
        if stored and self._listeners:
            self._publish_stored(stored, hashes, tokens, extras or EventExtras())

    def free(self, seq: SeqBlocks) -> None:
        """Release a finished or aborted sequence's blocks, tail first (vLLM's order)."""
        free = self._free
        for block in reversed(seq.blocks):
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                free[block.block_id] = block
                if block.block_hash is None:
                    free.move_to_end(block.block_id, last=False)  # reuse scratch blocks first
        seq.blocks = []

    def reset(self) -> None:
        """Forget every cached hash (pinned blocks stay allocated but become private)."""
        for block in self._by_hash.values():
            block.block_hash = None
        self._by_hash.clear()
        for listener in self._listeners:
            listener.all_blocks_cleared()

    def end_step(self) -> None:
        for listener in self._listeners:
            listener.step_finished()

    def eviction_order(self) -> list[bytes]:
        """Cached, unpinned hashes in the order they would be evicted (for tests and debugging)."""
        return [b.block_hash for b in self._free.values() if b.block_hash is not None]

    def _publish_stored(
        self,
        stored: list[int],
        hashes: Sequence[bytes],
        tokens: Sequence[int],
        extras: EventExtras,
    ) -> None:
        # Split into runs of consecutive indexes: one event per contiguous run, like vLLM's
        # cache_full_blocks, whose parent is the block just before the run.
        size = self.block_size
        runs: list[list[int]] = [[stored[0]]]
        for index in stored[1:]:
            if index == runs[-1][-1] + 1:
                runs[-1].append(index)
            else:
                runs.append([index])
        for run in runs:
            first, last = run[0], run[-1]
            event = BlocksStored(
                block_hashes=tuple(hashes[i] for i in run),
                parent_block_hash=hashes[first - 1] if first > 0 else None,
                token_ids=tuple(tokens[first * size : (last + 1) * size]),
                block_size=size,
                extra_keys=_event_extra_keys(extras, first, len(run)),
                lora_name=extras.lora_name,
            )
            for listener in self._listeners:
                listener.blocks_stored(event)


def _event_extra_keys(
    extras: EventExtras, first: int, count: int
) -> tuple[tuple[Any, ...] | None, ...] | None:
    """Per block, the untagged extras vLLM's events carry: the adapter name on every block,
    the salt on block 0 only; None when no block has any."""
    lora = (extras.lora_name,) if extras.lora_name is not None else ()
    salt = (extras.cache_salt,) if extras.cache_salt is not None else ()
    if not lora and not (salt and first == 0):
        return None
    keys = [(*lora, *salt) if first + i == 0 else lora for i in range(count)]
    return tuple(k or None for k in keys)
