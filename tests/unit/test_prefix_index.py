from __future__ import annotations

import subprocess
import sys

import pytest

from router.config import IndexConfig
from router.domain.worker import ReportedLoad, Worker
from router.routing.checkpoints import Checkpoints
from router.routing.prefix_index import PrefixIndex

BACKENDS = ["flat", "pygtrie"]


def make(backend: str, **kw: int) -> PrefixIndex:
    return PrefixIndex(
        IndexConfig(block_chars=4, dense_blocks=kw.pop("dense_blocks", 64), backend=backend, **kw)
    )


def text(prefix: str, n_blocks: int) -> str:
    return (prefix * 4 * n_blocks)[: 4 * n_blocks]


@pytest.mark.parametrize("backend", BACKENDS)
def test_insert_and_match_longest_shared_prefix_per_worker(backend: str) -> None:
    index = make(backend)
    shared = "S" * 40  # 10 blocks
    index.insert("a", index.block_keys(shared + "AAAAAAAA"))  # 12 blocks
    index.insert("b", index.block_keys(shared[:20]))  # 5 blocks
    query = index.block_keys(shared + "AAAA" + "XXXXXXXX")
    assert index.match(query) == {"a": 11, "b": 5}
    assert index.match(index.block_keys("ZZZZZZZZ")) == {}
    # Partial trailing chunk does not count.
    assert index.block_keys("abc") == []
    assert len(index.block_keys("abcdefghi")) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_keys_are_chained_and_stable_across_processes(backend: str) -> None:
    index = make(backend)
    a = index.block_keys("xxxx" + "yyyy")
    b = index.block_keys("zzzz" + "yyyy")
    assert a[1] != b[1]  # same chunk, different prefix
    code = (
        "from router.config import IndexConfig;"
        "from router.routing.prefix_index import PrefixIndex;"
        "print(PrefixIndex(IndexConfig(block_chars=4)).block_keys('xxxxyyyy'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(a)


def test_checkpoints_thin_out_geometrically() -> None:
    cp = Checkpoints(dense_blocks=4, block_chars=4)
    assert cp.positions[:12] == [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16]
    assert cp.weights[8] == 2
    assert cp.count(9) == 8 and cp.count(10) == 9
    assert cp.count(100_000) == len([p for p in cp.positions if p <= 100_000])


@pytest.mark.parametrize("backend", BACKENDS)
def test_evicts_least_recently_used_deepest_first_within_budget(backend: str) -> None:
    index = make(backend)
    index.set_capacity("a", 10)
    old = index.block_keys(text("o", 6))
    new = index.block_keys(text("n", 6))
    index.insert("a", old)
    index.insert("a", new)
    # 12 blocks into a budget of 10: the two deepest blocks of the older prompt go first.
    assert index.stats().blocks_per_worker["a"] == 10
    assert index.match(old) == {"a": 4}
    assert index.match(new) == {"a": 6}
    # Touching the old prompt makes the new one the least recently used.
    index.insert("a", old)
    assert index.match(old) == {"a": 6}
    assert index.match(new) == {"a": 4}
    assert index.stats().blocks == 10 == len(index)


@pytest.mark.parametrize("backend", BACKENDS)
def test_global_bound_evicts_from_largest_worker(backend: str) -> None:
    index = make(backend, max_blocks_total=10)
    index.insert("a", index.block_keys(text("a", 8)))
    index.insert("b", index.block_keys(text("b", 4)))
    stats = index.stats()
    assert stats.blocks == 10
    assert stats.blocks_per_worker == {"a": 6, "b": 4}


@pytest.mark.parametrize("backend", BACKENDS)
def test_remove_worker_purges_entries_and_prunes(backend: str) -> None:
    index = make(backend)
    keys = index.block_keys(text("p", 8))
    index.insert("a", keys)
    index.insert("b", keys[:3])
    index.remove_worker("a")
    assert index.match(keys) == {"b": 3}
    assert index.stats().blocks_per_worker == {"b": 3}
    index.remove_worker("b")
    assert len(index) == 0 and index.match(keys) == {}
    if backend == "flat":
        assert index._flat == {}
    else:
        assert len(index._trie) == 0 and index._parent == {}
    # A new worker reuses the freed slot.
    index.insert("c", keys)
    assert index.match(keys) == {"c": 8}


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_checkpoints_count_blocks(backend: str) -> None:
    index = make(backend, dense_blocks=4)
    index.insert("a", index.block_keys(text("q", 20)))  # checkpoints ... 16, 20
    assert index.match(index.block_keys(text("q", 20))) == {"a": 20}
    assert index.match(index.block_keys(text("q", 15) + "ZZZZZZZZ")) == {"a": 14}
    assert index.stats().blocks == 20


def test_capacity_synced_from_worker_reports() -> None:
    index = make("flat")
    w = Worker(
        id="w", url="http://w", pool="p", reported=ReportedLoad(num_gpu_blocks=100, block_size=16)
    )
    index.sync_capacities([w])
    assert index.stats().budget_per_worker == {"w": 100 * 16 // 1}  # block_chars 4 -> 1 token/block
    w.kv_capacity_blocks = 10
    index.sync_capacities([w])
    assert index.stats().budget_per_worker == {"w": 160}


def test_a_partition_keys_equal_text_apart() -> None:
    index = PrefixIndex(IndexConfig())
    text = "the same long prompt " * 40
    plain, salted = index.block_keys(text), index.block_keys(text, "adapter\x1fsalt")
    assert len(plain) == len(salted) and not set(plain) & set(salted)
    assert index.block_keys(text, "adapter\x1fsalt") == salted  # stable
