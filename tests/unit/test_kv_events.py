"""KV event wire format against the byte dumps of reference/vllm-interface.md §1.4 and §1.5."""

from __future__ import annotations

import msgpack
import pytest

from router.vllm_wire.kv_events import (
    END_SEQ,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventMessage,
    KVEventBatch,
    KVEventDecodeError,
    decode_batch,
    encode_batch,
    event_frames,
    parse_event_frames,
    parse_replay_reply,
    parse_replay_request,
    replay_batch_frames,
    replay_end_frames,
    replay_request_frames,
)

HASH_1 = 0x137BB037547F4CAF  # sha256 of tokens 1..16, default seed (§2.8)
TS = b"\xcb\x41\xd9\x54\xfc\x40\x20\x00\x00"  # float64 1700000000.5
TOKENS = b"\xdc\x00\x10" + bytes(range(1, 17))  # array16 of fixints 1..16
HASHES = b"\x91\xcf\x13\x7b\xb0\x37\x54\x7f\x4c\xaf"


def s(text: str) -> bytes:
    """A msgpack fixstr."""
    raw = text.encode()
    assert len(raw) < 32
    return bytes([0xA0 | len(raw)]) + raw


# §1.4, frame 2, written out from the dump.
MAP_PAYLOAD = (
    b"\x93"
    + TS
    + b"\x91"
    + b"\xde\x00\x09"
    + s("type") + s("BlockStored")
    + s("block_hashes") + HASHES
    + s("parent_block_hash") + b"\xc0"
    + s("token_ids") + TOKENS
    + s("block_size") + b"\x10"
    + s("lora_id") + b"\xc0"
    + s("medium") + s("GPU")
    + s("lora_name") + b"\xc0"
    + s("group_idx") + b"\x00"
    + b"\x00"
)  # fmt: skip

LEGACY_PAYLOAD = (
    b"\x93" + TS + b"\x91\x9c" + s("BlockStored") + HASHES + b"\xc0" + TOKENS
    + b"\x10\xc0" + s("GPU") + b"\xc0\xc0\x00\xc0\xc0" + b"\x00"
)  # fmt: skip

CLEARED_PAYLOAD = b"\x93" + TS + b"\x91\x81" + s("type") + s("AllBlocksCleared") + b"\x00"

STORED = BlockStored(
    block_hashes=(HASH_1,),
    parent_block_hash=None,
    token_ids=tuple(range(1, 17)),
    block_size=16,
    medium="GPU",
    group_idx=0,
)
BATCH = KVEventBatch(ts=1700000000.5, events=(STORED,), dp_rank=0)


def test_dump_lengths_match_the_reference() -> None:
    assert len(MAP_PAYLOAD) == 157
    assert len(CLEARED_PAYLOAD) == 35


def test_decode_map_dump() -> None:
    assert decode_batch(MAP_PAYLOAD) == BATCH


def test_encode_map_is_byte_exact() -> None:
    assert encode_batch(BATCH, "map") == MAP_PAYLOAD


def test_legacy_array_both_ways() -> None:
    assert encode_batch(BATCH, "array") == LEGACY_PAYLOAD
    assert decode_batch(LEGACY_PAYLOAD) == BATCH


def test_all_blocks_cleared_batch() -> None:
    batch = KVEventBatch(ts=1700000000.5, events=(AllBlocksCleared(),), dp_rank=0)
    assert encode_batch(batch) == CLEARED_PAYLOAD
    assert decode_batch(CLEARED_PAYLOAD) == batch
    assert decode_batch(encode_batch(batch, "array")) == batch


def test_removed_round_trips_in_both_forms() -> None:
    batch = KVEventBatch(
        ts=1.25, events=(BlockRemoved((HASH_1,), "GPU"), BlockRemoved((7,), None, 0)), dp_rank=None
    )
    for fmt in ("map", "array"):
        assert decode_batch(encode_batch(batch, fmt)) == batch
    raw = msgpack.unpackb(encode_batch(batch), raw=False)
    assert raw[1][0] == {"type": "BlockRemoved", "block_hashes": [HASH_1], "medium": "GPU"}


def test_bytes_hashes_become_low_64_bit_ints() -> None:
    digest = bytes(range(24)) + HASH_1.to_bytes(8, "big")
    parent = bytes(range(32))
    payload = msgpack.packb(
        [
            2.0,
            [
                {"type": "BlockStored", "block_hashes": [digest], "parent_block_hash": parent,
                 "token_ids": [1], "block_size": 16, "lora_id": None, "medium": "GPU",
                 "lora_name": None},
                ["BlockRemoved", [digest], "GPU"],
            ],
            0,
        ],
        use_bin_type=True,
    )  # fmt: skip
    batch = decode_batch(payload)
    stored, removed = batch.events
    assert isinstance(stored, BlockStored) and isinstance(removed, BlockRemoved)
    assert stored.block_hashes == (HASH_1,)
    assert stored.parent_block_hash == int.from_bytes(parent[-8:], "big")
    assert removed.block_hashes == (HASH_1,)


def test_unknown_keys_and_kinds_are_ignored_missing_optionals_tolerated() -> None:
    payload = msgpack.packb(
        [
            3.0,
            [
                {"type": "BlockStored", "block_hashes": [5], "parent_block_hash": 4,
                 "token_ids": [], "block_size": 16, "locality": "LOCAL", "session_id": "s",
                 "lookahead_token_ids": [[1, 2]], "kv_cache_spec_kind": "full"},
                {"type": "SomethingNew", "x": 1},
                ["BlockStored", [6], None, [1, 2], 2, None],  # the oldest 6-element layout
                ["BlockRemoved", [5]],
            ],
        ]  # no dp_rank at all
    )  # fmt: skip
    batch = decode_batch(payload)
    assert batch.dp_rank is None
    assert batch.events == (
        BlockStored(block_hashes=(5,), parent_block_hash=4, block_size=16),
        BlockStored(block_hashes=(6,), token_ids=(1, 2), block_size=2),
        BlockRemoved(block_hashes=(5,)),
    )


def test_extra_keys_round_trip() -> None:
    stored = BlockStored((1, 2), None, tuple(range(4)), 2, extra_keys=(("salt",), None))
    batch = KVEventBatch(1.0, (stored,), 0)
    assert decode_batch(encode_batch(batch)) == batch


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",  # never-used msgpack byte
        b"\x93\xcb\x41",  # truncated
        msgpack.packb({"ts": 1.0}),
        msgpack.packb([1.0]),
        msgpack.packb(["x", [], 0]),
        msgpack.packb([1.0, [{"type": "BlockStored"}], 0]),
        msgpack.packb([1.0, [{"type": "BlockStored", "block_hashes": ["x"]}], 0]),
        msgpack.packb([1.0, [42], 0]),
        MAP_PAYLOAD + b"\x00",  # trailing bytes
    ],
)
def test_garbage_raises(payload: bytes) -> None:
    with pytest.raises(KVEventDecodeError):
        decode_batch(payload)


def test_event_frames() -> None:
    frames = event_frames(0, MAP_PAYLOAD, "kv-events")
    assert frames[0] == b"kv-events" and frames[1] == bytes(8)
    assert parse_event_frames(frames) == EventMessage(0, MAP_PAYLOAD, "kv-events")
    assert parse_event_frames(event_frames(2**40 + 3, b"p")).seq == 2**40 + 3
    with pytest.raises(KVEventDecodeError):
        parse_event_frames([b"", b"\x00", b"p"])
    with pytest.raises(KVEventDecodeError):
        parse_event_frames([b"", b"p"])


def test_replay_frames_both_shapes() -> None:
    assert replay_request_frames(5) == [b"", (5).to_bytes(8, "big")]
    assert parse_replay_request([b"id", *replay_request_frames(5)]) == (b"id", 5)
    assert parse_replay_request([b"id", b"", b"\x05"]) is None
    assert parse_replay_request([b"id", b"\x05"]) is None
    message = EventMessage(9, b"payload", "t")
    new = replay_batch_frames(b"id", message)
    old = replay_batch_frames(b"id", message, legacy=True)
    assert new == [b"id", b"", b"t", (9).to_bytes(8, "big"), b"payload"]
    assert old == [b"id", b"", (9).to_bytes(8, "big"), b"payload"]
    # A DEALER sees the frames after the identity.
    assert parse_replay_reply(new[1:]) == message
    assert parse_replay_reply(old[1:]) == EventMessage(9, b"payload", "")
    assert replay_end_frames(b"id") == [b"id", b"", b"", END_SEQ, b""]
    assert parse_replay_reply(replay_end_frames(b"id")[1:]) is None
    assert parse_replay_reply(replay_end_frames(b"id", legacy=True)[1:]) is None
    with pytest.raises(KVEventDecodeError):
        parse_replay_reply([b"x", b"y"])
