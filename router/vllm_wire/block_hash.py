"""vLLM's chained prefix-cache block hashes, reproduced byte for byte.

vLLM keys its automatic prefix cache by a hash chain over full token blocks:
``hash_i = H((hash_{i-1}, tuple(block_i_tokens), extra_keys_i))`` with ``NONE_HASH = H(seed)`` as
the root parent, where ``H`` is SHA-256 over either pickle protocol 5 (``sha256``, vLLM's default)
or canonical CBOR (``sha256_cbor``). KV events carry the low 64 bits of each digest as an unsigned
big-endian integer. The gateway's precise routing mode and the simulated worker both hash every
request with these functions, so they avoid per-call work: the root hash is cached per
(algorithm, seed) and the token sequence is converted to a tuple once so that block slices are
already tuples. The test vectors of ``reference/vllm-interface.md`` §2.8 pin the exact output.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, Literal

import cbor2

HashAlgo = Literal["sha256", "sha256_cbor"]
DEFAULT_NONE_HASH_SEED = "vllm-none-hash"
DEFAULT_BLOCK_SIZE = 16

# Bound once: these are looked up on every block of every request.
_sha256 = hashlib.sha256
_pickle_dumps = pickle.dumps
_cbor_dumps = cbor2.dumps
_PICKLE_PROTOCOL = 5  # pickle.HIGHEST_PROTOCOL on the Pythons vLLM supports; pinned for stability


def _digest(obj: Any, algo: HashAlgo) -> bytes:
    if algo == "sha256":
        return _sha256(_pickle_dumps(obj, protocol=_PICKLE_PROTOCOL)).digest()
    if algo == "sha256_cbor":
        return _sha256(_cbor_dumps(obj, canonical=True)).digest()
    raise ValueError(f"unsupported prefix-caching hash algorithm: {algo!r}")


def hash_block_tokens(
    parent: bytes,
    tokens: Sequence[int],
    extra_keys: tuple[Any, ...] | None = None,
    algo: HashAlgo = "sha256",
) -> bytes:
    """Return the 32-byte digest of one block chained onto ``parent`` (vLLM ``hash_block_tokens``).

    ``tokens`` must hold Python ints: pickle encodes numpy ints differently, which would silently
    break compatibility with vLLM.
    """
    block = tokens if type(tokens) is tuple else tuple(tokens)
    return _digest((parent, block, extra_keys), algo)


@lru_cache(maxsize=32)
def none_hash(algo: HashAlgo = "sha256", seed: str = DEFAULT_NONE_HASH_SEED) -> bytes:
    """Return vLLM's root parent hash ``NONE_HASH = H(seed)`` (cached: it never changes)."""
    return _digest(seed, algo)


LoraKey = tuple[str, str]
"""A LoRA adapter as vLLM's block hashes see it: (lora_name, lora_path)."""


def block_extra_keys(
    block_index: int,
    cache_salt: str | None,
    tagged_extras: bool = True,
    lora: LoraKey | None = None,
) -> tuple[Any, ...] | None:
    """Return the extra keys vLLM mixes into block ``block_index`` (LoRA and salt are modelled).

    In vLLM's order: the LoRA adapter on every block, then the salt in block 0 only (later
    blocks inherit it through the chain). vLLM >= 0.31 tags each extra (``("lora", name,
    path)``, ``("cache_salt", salt)``); older releases put the bare name and string.
    """
    extras: list[Any] = []
    if lora is not None:
        extras.append(("lora", *lora) if tagged_extras else lora[0])
    if cache_salt is not None and block_index == 0:
        extras.append(("cache_salt", cache_salt) if tagged_extras else cache_salt)
    return tuple(extras) if extras else None


def block_hashes(
    tokens: Sequence[int],
    block_size: int = DEFAULT_BLOCK_SIZE,
    algo: HashAlgo = "sha256",
    seed: str = DEFAULT_NONE_HASH_SEED,
    cache_salt: str | None = None,
    tagged_extras: bool = True,
    lora: LoraKey | None = None,
) -> list[bytes]:
    """Return the chained digests of every *full* block of ``tokens`` (a partial tail is not)."""
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    toks = tokens if type(tokens) is tuple else tuple(tokens)
    n_full = len(toks) // block_size
    if n_full == 0:
        return []
    digest = _digest
    parent = none_hash(algo, seed)
    out: list[bytes] = []
    append = out.append
    extra = block_extra_keys(0, cache_salt, tagged_extras, lora)
    parent = digest((parent, toks[0:block_size], extra), algo)
    append(parent)
    rest = block_extra_keys(1, cache_salt, tagged_extras, lora)
    for start in range(block_size, n_full * block_size, block_size):
        parent = digest((parent, toks[start : start + block_size], rest), algo)
        append(parent)
    return out


def extend_block_hashes(
    hashes: list[bytes],
    tokens: Sequence[int],
    block_size: int = DEFAULT_BLOCK_SIZE,
    algo: HashAlgo = "sha256",
    seed: str = DEFAULT_NONE_HASH_SEED,
    cache_salt: str | None = None,
    tagged_extras: bool = True,
    lora: LoraKey | None = None,
) -> list[bytes]:
    """Append to ``hashes`` the digests of full blocks of ``tokens`` it does not cover yet.

    ``hashes`` must be the chain of the leading blocks of ``tokens``; this lets a sequence that
    grows (decode) hash only its new blocks, as vLLM's request block hasher does.
    """
    n_full = len(tokens) // block_size
    for index in range(len(hashes), n_full):
        start = index * block_size
        parent = hashes[-1] if hashes else none_hash(algo, seed)
        hashes.append(
            hash_block_tokens(
                parent,
                tuple(tokens[start : start + block_size]),
                block_extra_keys(index, cache_salt, tagged_extras, lora),
                algo,
            )
        )
    return hashes


def to_event_int(digest: bytes) -> int:
    """Return the low 64 bits of ``digest`` as vLLM's KV events publish them (big-endian)."""
    return int.from_bytes(digest[-8:], "big")
