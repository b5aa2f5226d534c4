"""vLLM block hashing against the test vectors of reference/vllm-interface.md §2.8."""

from __future__ import annotations

import cbor2
import pytest

from router.vllm_wire.block_hash import (
    block_hashes,
    extend_block_hashes,
    hash_block_tokens,
    none_hash,
    to_event_int,
)

TOKENS = list(range(1, 33))

# (algo, seed, NONE_HASH hex prefix, block 1 event int, block 2 event int)
CHAIN_VECTORS = [
    ("sha256", "vllm-none-hash", "066b1e8987e02713", 1403909460543360175, 1643945449041937783),
    ("sha256", "0", "1973e23848344dc4", 7536218907325174565, 9048537298590080561),
    ("sha256_cbor", "vllm-none-hash", "9bd96a485ad84efd", 8866452693264111234, 807986237951177663),
    ("sha256_cbor", "0", "4e1195df020de59e", 3236607068019569386, 2758186210834249151),
]

# (algo, seed, tagged block 1 event int, untagged block 1 event int), cache_salt="abc"
SALT_VECTORS = [
    ("sha256", "vllm-none-hash", 3916535347477951230, 9645952006943066118),
    ("sha256", "0", 9005342767054099760, 1787419492148379480),
    ("sha256_cbor", "vllm-none-hash", 1845123984349157862, 7264059573408817587),
    ("sha256_cbor", "0", 9427217785448712521, 8028874423489213987),
]


@pytest.mark.parametrize(("algo", "seed", "none_prefix", "block1", "block2"), CHAIN_VECTORS)
def test_chain_vectors(algo: str, seed: str, none_prefix: str, block1: int, block2: int) -> None:
    root = none_hash(algo, seed)
    assert len(root) == 32
    assert root.hex().startswith(none_prefix)
    hashes = block_hashes(TOKENS, 16, algo, seed)  # type: ignore[arg-type]
    assert [to_event_int(h) for h in hashes] == [block1, block2]
    # The lower-level primitive chains to the same digests.
    h1 = hash_block_tokens(root, TOKENS[:16], None, algo)  # type: ignore[arg-type]
    h2 = hash_block_tokens(h1, TOKENS[16:], None, algo)  # type: ignore[arg-type]
    assert [h1, h2] == hashes


@pytest.mark.parametrize(("algo", "seed", "tagged", "untagged"), SALT_VECTORS)
def test_cache_salt_vectors(algo: str, seed: str, tagged: int, untagged: int) -> None:
    salted = block_hashes(TOKENS[:16], 16, algo, seed, cache_salt="abc")  # type: ignore[arg-type]
    assert [to_event_int(h) for h in salted] == [tagged]
    plain = block_hashes(
        TOKENS[:16],
        16,
        algo,  # type: ignore[arg-type]
        seed,
        cache_salt="abc",
        tagged_extras=False,
    )
    assert [to_event_int(h) for h in plain] == [untagged]


def test_salt_changes_whole_chain_but_only_enters_block_zero() -> None:
    plain = block_hashes(TOKENS)
    salted = block_hashes(TOKENS, cache_salt="abc")
    assert plain[0] != salted[0] and plain[1] != salted[1]
    # Block 1 of the salted chain has no extras of its own: it differs only through its parent.
    assert salted[1] == hash_block_tokens(salted[0], TOKENS[16:32], None, "sha256")


def test_partial_blocks_are_not_hashed() -> None:
    assert block_hashes(TOKENS[:15]) == []
    assert len(block_hashes(TOKENS[:31])) == 1
    assert block_hashes(TOKENS[:8], block_size=4) == block_hashes(tuple(TOKENS[:10]), block_size=4)


def test_extend_matches_full_hashing() -> None:
    tokens = list(range(100))
    hashes = block_hashes(tokens[:40], cache_salt="s")
    extend_block_hashes(hashes, tokens, cache_salt="s")
    assert hashes == block_hashes(tokens, cache_salt="s")
    empty: list[bytes] = []
    assert extend_block_hashes(empty, tokens, 16, "sha256_cbor") == block_hashes(
        tokens, 16, "sha256_cbor"
    )


def test_cbor_serialisation_shape() -> None:
    # The CBOR form is array(3)[bstr(32), array(B) of uint, null]: pinned by §2.3.
    encoded = cbor2.dumps((b"\0" * 32, (1, 2), None), canonical=True)
    assert encoded == bytes([0x83, 0x58, 0x20]) + b"\0" * 32 + bytes([0x82, 0x01, 0x02, 0xF6])


def test_event_int_is_low_64_bits_big_endian() -> None:
    digest = bytes(range(32))
    assert to_event_int(digest) == int.from_bytes(digest, "big") & (2**64 - 1)
    assert to_event_int(digest) == 0x18191A1B1C1D1E1F


def test_unknown_algo_rejected() -> None:
    with pytest.raises(ValueError):
        hash_block_tokens(b"\0" * 32, [1], None, "xxhash")  # type: ignore[arg-type]
