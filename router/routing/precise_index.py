"""The precise prefix index: which workers hold which vLLM KV blocks, by vLLM's own block hashes.

Keys are the 64-bit event ints of vLLM's chained block hashes (`vllm_wire.block_hash`), so a
block's key stands for its whole prefix and a worker's KV events say exactly which keys it holds.
Two kinds of entries map a key to a bitmask of worker slots:
- *confirmed*: applied from the workers' KV events (`apply`: stored, removed, cleared), via their
  agents and Redis (`state.kv_follower`);
- *speculative*: the blocks of a request the gateway just routed (`speculate`), so requests that
  follow it before its events arrive see it too. They expire after `ttl_s` unless an event
  confirms them first (vLLM may never store them: the request can fail or be evicted at once).
`match` walks a prompt's keys in order and stops at the first block nobody holds, so it costs
O(matched blocks). Each worker's entries are bounded by its KV capacity (else a default): the
confirmed ones in store order (evicting the oldest only guards against lost removals, since the
worker itself never holds more), the speculative ones in expiry order. No event says which
block a hit refreshed, so the order is not the worker's LRU; it does not need to be.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from router.domain.worker import Worker

STORED, REMOVED, CLEARED = "stored", "removed", "cleared"


@dataclass(slots=True)
class _Holder:
    bit: int
    budget: int
    confirmed: OrderedDict[int, None] = field(default_factory=OrderedDict)
    speculative: OrderedDict[int, float] = field(default_factory=OrderedDict)
    """key -> expiry (monotonic seconds); insertion order is expiry order (one TTL for all)."""


class PreciseIndex:
    def __init__(
        self,
        block_size: int,
        ttl_s: float,
        default_capacity_blocks: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.block_size = block_size
        self.ttl_s = ttl_s
        self._default_capacity = default_capacity_blocks
        self._clock = clock
        self._holders: dict[str, _Holder] = {}
        self._owners: dict[int, str] = {}
        self._confirmed: dict[int, int] = {}
        self._speculative: dict[int, int] = {}
        self._capacity_seen: dict[str, int | None] = {}
        self._next_expiry = float("inf")

    # -- queries ----------------------------------------------------------------------------

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """Worker id -> how many leading blocks of `hashes` it holds (confirmed or speculative)."""
        if not hashes:
            return {}
        self._expire()
        confirmed, speculative = self._confirmed.get, self._speculative.get
        result: dict[str, int] = {}
        alive = -1  # every slot, until the first block says who holds it
        depth = 0
        for h in hashes:
            mask = confirmed(h, 0) | speculative(h, 0)
            dropped = alive & ~mask if depth else 0
            if dropped:
                self._record(result, dropped, depth)
            alive &= mask
            if not alive:
                return result
            depth += 1
        self._record(result, alive, depth)
        return result

    def _record(self, result: dict[str, int], bits: int, depth: int) -> None:
        owners = self._owners
        while bits:
            low = bits & -bits
            owner = owners.get(low.bit_length() - 1)
            if owner is not None:
                result[owner] = depth
            bits ^= low

    def cached_tokens(self, blocks: int, prompt_tokens: int) -> int:
        """Tokens vLLM would report cached for `blocks` matched blocks: whole blocks, and never
        the prompt's last token (vLLM recomputes it, so a full hit counts one block less)."""
        usable = max(0, (prompt_tokens - 1) // self.block_size)
        return min(blocks, usable) * self.block_size

    def blocks_of(self, worker_id: str) -> int:
        holder = self._holders.get(worker_id)
        return len(holder.confirmed) + len(holder.speculative) if holder else 0

    def speculative_count(self, worker_id: str) -> int:
        """Unexpired speculative blocks of the worker."""
        self._expire()
        holder = self._holders.get(worker_id)
        return len(holder.speculative) if holder else 0

    def confirmed_of(self, worker_id: str) -> set[int]:
        holder = self._holders.get(worker_id)
        return set(holder.confirmed) if holder else set()

    def holds(self, worker_id: str, key: int) -> bool:
        """Whether the worker is believed to hold `key` (confirmed, or speculative and fresh)."""
        self._expire()
        holder = self._holders.get(worker_id)
        return holder is not None and (key in holder.confirmed or key in holder.speculative)

    def workers(self) -> list[str]:
        return list(self._holders)

    # -- updates ----------------------------------------------------------------------------

    def speculate(self, worker_id: str, hashes: Sequence[int]) -> None:
        """The gateway routed a request with these blocks to the worker: believe it holds them
        for `ttl_s`, unless an event says so (or not) first."""
        if not hashes:
            return
        holder = self._holder(worker_id)
        bit = 1 << holder.bit
        expiry = self._clock() + self.ttl_s
        confirmed, spec, masks = holder.confirmed, holder.speculative, self._speculative
        for h in hashes:
            if h in confirmed:
                continue
            if h in spec:
                spec.move_to_end(h)
            else:
                masks[h] = masks.get(h, 0) | bit
            spec[h] = expiry
        self._next_expiry = min(self._next_expiry, expiry)
        while len(spec) > holder.budget:
            self._drop(self._speculative, spec.popitem(last=False)[0], bit)

    def apply(self, worker_id: str, op: str, hashes: Iterable[int] = ()) -> None:
        """Apply one KV event of the worker: `stored`, `removed` or `cleared`."""
        if op == CLEARED:
            holder = self._holders.get(worker_id)
            if holder is not None:
                self._clear(holder)
            return
        holder = self._holder(worker_id)
        bit = 1 << holder.bit
        confirmed, spec = holder.confirmed, holder.speculative
        if op == STORED:
            masks = self._confirmed
            for h in hashes:
                if spec.pop(h, None) is not None:
                    self._drop(self._speculative, h, bit)
                if h in confirmed:
                    confirmed.move_to_end(h)
                    continue
                confirmed[h] = None
                masks[h] = masks.get(h, 0) | bit
            while len(confirmed) > holder.budget:
                self._drop(self._confirmed, confirmed.popitem(last=False)[0], bit)
        elif op == REMOVED:
            for h in hashes:
                if h in confirmed:
                    del confirmed[h]
                    self._drop(self._confirmed, h, bit)
                if spec.pop(h, None) is not None:
                    self._drop(self._speculative, h, bit)
        else:
            raise ValueError(f"unknown KV op {op!r}")

    def load_snapshot(self, worker_id: str, hashes: Iterable[int]) -> None:
        """Replace the worker's confirmed blocks with a snapshot (speculative ones stay)."""
        holder = self._holder(worker_id)
        bit = 1 << holder.bit
        for h in holder.confirmed:
            self._drop(self._confirmed, h, bit)
        holder.confirmed.clear()
        self.apply(worker_id, STORED, hashes)

    def reset_confirmed(self) -> None:
        """Forget every confirmed block of every worker (before rebuilding from snapshots)."""
        for holder in self._holders.values():
            holder.confirmed.clear()
        self._confirmed.clear()

    def set_capacity(self, worker_id: str, blocks: int) -> None:
        holder = self._holder(worker_id)
        holder.budget = max(1, blocks)
        bit = 1 << holder.bit
        while len(holder.confirmed) > holder.budget:
            self._drop(self._confirmed, holder.confirmed.popitem(last=False)[0], bit)
        while len(holder.speculative) > holder.budget:
            self._drop(self._speculative, holder.speculative.popitem(last=False)[0], bit)

    def sync_capacities(self, workers: Iterable[Worker]) -> None:
        """Bound each worker by its KV capacity when that changed (cheap per pick)."""
        for worker in workers:
            capacity = worker.capacity_blocks
            if self._capacity_seen.get(worker.id, -1) == capacity:
                continue
            self._capacity_seen[worker.id] = capacity
            self.set_capacity(worker.id, capacity or self._default_capacity)

    def remove_worker(self, worker_id: str) -> None:
        """Purge a worker that left the pool, and free its slot."""
        self._capacity_seen.pop(worker_id, None)
        holder = self._holders.pop(worker_id, None)
        if holder is None:
            return
        self._clear(holder)
        del self._owners[holder.bit]

    # -- internals --------------------------------------------------------------------------

    def _holder(self, worker_id: str) -> _Holder:
        holder = self._holders.get(worker_id)
        if holder is None:
            slot = next(i for i in range(len(self._owners) + 1) if i not in self._owners)
            self._owners[slot] = worker_id
            holder = _Holder(bit=slot, budget=self._default_capacity)
            self._holders[worker_id] = holder
        return holder

    def _clear(self, holder: _Holder) -> None:
        bit = 1 << holder.bit
        for h in holder.confirmed:
            self._drop(self._confirmed, h, bit)
        for h in holder.speculative:
            self._drop(self._speculative, h, bit)
        holder.confirmed.clear()
        holder.speculative.clear()

    @staticmethod
    def _drop(masks: dict[int, int], key: int, bit: int) -> None:
        mask = masks.get(key, 0) & ~bit
        if mask:
            masks[key] = mask
        else:
            masks.pop(key, None)

    def _expire(self) -> None:
        now = self._clock()
        if now < self._next_expiry:
            return  # the common case: nothing is due, and this costs one comparison
        nearest = float("inf")
        for holder in self._holders.values():
            spec, bit = holder.speculative, 1 << holder.bit
            while spec:
                key, expiry = next(iter(spec.items()))
                if expiry > now:
                    nearest = min(nearest, expiry)
                    break
                del spec[key]
                self._drop(self._speculative, key, bit)
        self._next_expiry = nearest


@runtime_checkable
class FollowsKVEvents(Protocol):
    """A policy that routes on workers' KV events (hybrid in precise mode): its index."""

    precise: PreciseIndex | None
