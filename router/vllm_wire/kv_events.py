"""vLLM's KV cache event wire format: batches, events, ZMQ frames and the replay protocol.

A vLLM worker publishes the prefix-cache changes of each engine step as one msgpack ``EventBatch``
``[ts, events, dp_rank]`` in a 3-frame ZMQ multipart (topic, 8-byte big-endian seq, payload), and
serves missed batches on a ROUTER socket (``reference/vllm-interface.md`` §1.2-1.5). Events come in
two encodings: tagged arrays (vLLM <= 0.23, positional, shorter in older releases) and tagged maps
(>= 0.24, keyed by name, ``None`` optionals omitted). The decoder accepts both, hashes as uint64
or as raw digests (reduced to the low 64 bits, §2.4, so consumers have one key type), ignores
fields and event types it does not know, and raises ``KVEventDecodeError`` on anything malformed.
The encoder reproduces msgspec's bytes exactly (map16 header for ``BlockStored``, smallest int
widths, float64 timestamps), which is what lets the simulated worker stand in for vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgpack

EventFormat = Literal["map", "array"]

SEQ_BYTES = 8
END_SEQ = b"\xff" * SEQ_BYTES  # (-1).to_bytes(8, "big", signed=True): end of a replay
_HASH_MASK = (1 << 64) - 1
MEDIUM_GPU = "GPU"


class KVEventDecodeError(ValueError):
    """A frame or payload that is not a KV event batch vLLM could have sent."""


@dataclass(frozen=True, slots=True)
class BlockStored:
    """A run of newly cached blocks of one request (hashes as low-64-bit ints)."""

    block_hashes: tuple[int, ...]
    parent_block_hash: int | None = None  # None when the first block is at position 0
    token_ids: tuple[int, ...] = ()
    block_size: int = 0  # 0 only when a very old sender omitted it
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: tuple[tuple[Any, ...] | None, ...] | None = None
    group_idx: int | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Blocks evicted from the prefix cache (vLLM sends one hash per event)."""

    block_hashes: tuple[int, ...]
    medium: str | None = None
    group_idx: int | None = None


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """The whole prefix cache was reset."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class KVEventBatch:
    """The events of one engine step."""

    ts: float
    events: tuple[KVEvent, ...]
    dp_rank: int | None = 0


# -- encoding -------------------------------------------------------------------------------


def _pack(value: Any) -> bytes:
    # Defaults match msgspec: bin type for bytes, float64 for floats, smallest int widths.
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def _map_header(entries: int, wide: bool) -> bytes:
    # msgspec sizes a struct's map header by its declared field count, not by the entries it
    # writes: BlockStored (15 fields + tag) always gets map16 even with 9 entries.
    if wide:
        return b"\xde" + entries.to_bytes(2, "big")
    return bytes([0x80 | entries])


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def _pack_map(fields: list[tuple[str, Any]], wide: bool) -> bytes:
    parts = [_map_header(len(fields), wide)]
    for key, value in fields:
        parts.append(_pack(key))
        parts.append(_pack(value))
    return b"".join(parts)


def _encode_event(event: KVEvent, fmt: EventFormat) -> bytes:
    if isinstance(event, BlockStored):
        required: list[tuple[str, Any]] = [
            ("block_hashes", list(event.block_hashes)),
            ("parent_block_hash", event.parent_block_hash),
            ("token_ids", list(event.token_ids)),
            ("block_size", event.block_size),
            ("lora_id", event.lora_id),
            ("medium", event.medium),
            ("lora_name", event.lora_name),
        ]
        extra_keys = (
            None
            if event.extra_keys is None
            else [None if e is None else list(e) for e in event.extra_keys]
        )
        if fmt == "array":
            # 0.23 layout: every field positional, including kv_cache_spec_kind/_sliding_window.
            values = [v for _, v in required] + [extra_keys, event.group_idx, None, None]
            return _pack(["BlockStored", *values])
        optional = [("extra_keys", extra_keys), ("group_idx", event.group_idx)]
        fields = [("type", "BlockStored"), *required]
        fields += [(k, v) for k, v in optional if v is not None]
        return _pack_map(fields, wide=True)
    if isinstance(event, BlockRemoved):
        if fmt == "array":
            return _pack(["BlockRemoved", list(event.block_hashes), event.medium, event.group_idx])
        fields = [
            ("type", "BlockRemoved"),
            ("block_hashes", list(event.block_hashes)),
            ("medium", event.medium),
        ]
        if event.group_idx is not None:
            fields.append(("group_idx", event.group_idx))
        return _pack_map(fields, wide=False)
    if fmt == "array":
        return _pack(["AllBlocksCleared"])
    return _pack_map([("type", "AllBlocksCleared")], wide=False)


def encode_batch(batch: KVEventBatch, fmt: EventFormat = "map") -> bytes:
    """Return the msgpack payload vLLM would send (``map``: >= 0.24, ``array``: <= 0.23)."""
    if fmt not in ("map", "array"):
        raise ValueError(f"unknown KV event format {fmt!r}")
    parts = [b"\x93", _pack(float(batch.ts)), _array_header(len(batch.events))]
    parts.extend(_encode_event(event, fmt) for event in batch.events)
    parts.append(_pack(batch.dp_rank))
    return b"".join(parts)


# -- decoding -------------------------------------------------------------------------------


def _hash(value: Any) -> int:
    if type(value) is int:
        return value & _HASH_MASK
    if isinstance(value, bytes):
        return int.from_bytes(value[-8:], "big")  # the low 64 bits, as vLLM's int mode sends
    raise KVEventDecodeError(f"block hash must be an int or bytes, got {type(value).__name__}")


def _hashes(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise KVEventDecodeError("block_hashes must be an array")
    return tuple(_hash(v) for v in value)


def _opt_hash(value: Any) -> int | None:
    return None if value is None else _hash(value)


def _opt_int(value: Any, name: str) -> int | None:
    if value is None or type(value) is int:
        return value
    raise KVEventDecodeError(f"{name} must be an int or nil")


def _opt_str(value: Any, name: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise KVEventDecodeError(f"{name} must be a string or nil")


def _token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(type(t) is int for t in value):
        raise KVEventDecodeError("token_ids must be an array of ints")
    return tuple(value)


def _extra_keys(value: Any) -> tuple[tuple[Any, ...] | None, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise KVEventDecodeError("extra_keys must be an array or nil")
    return tuple(tuple(e) if isinstance(e, list) else None if e is None else (e,) for e in value)


_STORED_ORDER = (
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
)
_REMOVED_ORDER = ("block_hashes", "medium", "group_idx")


def _fields(raw: list[Any] | dict[Any, Any], order: Sequence[str]) -> dict[str, Any]:
    """Name the fields of either wire form; legacy arrays may be shorter (older releases)."""
    if isinstance(raw, dict):
        return raw
    return dict(zip(order, raw[1:], strict=False))


def _decode_event(raw: Any) -> KVEvent | None:
    if isinstance(raw, dict):
        tag = raw.get("type")
    elif isinstance(raw, list) and raw:
        tag = raw[0]
    else:
        raise KVEventDecodeError("an event must be a tagged map or a tagged array")
    if tag == "BlockStored":
        f = _fields(raw, _STORED_ORDER)
        if "block_hashes" not in f:
            raise KVEventDecodeError("BlockStored without block_hashes")
        block_size = f.get("block_size")
        if block_size is not None and type(block_size) is not int:
            raise KVEventDecodeError("block_size must be an int")
        return BlockStored(
            block_hashes=_hashes(f["block_hashes"]),
            parent_block_hash=_opt_hash(f.get("parent_block_hash")),
            token_ids=_token_ids(f.get("token_ids")),
            block_size=block_size or 0,
            lora_id=_opt_int(f.get("lora_id"), "lora_id"),
            medium=_opt_str(f.get("medium"), "medium"),
            lora_name=_opt_str(f.get("lora_name"), "lora_name"),
            extra_keys=_extra_keys(f.get("extra_keys")),
            group_idx=_opt_int(f.get("group_idx"), "group_idx"),
        )
    if tag == "BlockRemoved":
        f = _fields(raw, _REMOVED_ORDER)
        if "block_hashes" not in f:
            raise KVEventDecodeError("BlockRemoved without block_hashes")
        return BlockRemoved(
            block_hashes=_hashes(f["block_hashes"]),
            medium=_opt_str(f.get("medium"), "medium"),
            group_idx=_opt_int(f.get("group_idx"), "group_idx"),
        )
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    if isinstance(tag, str):
        return None  # an event kind from a newer vLLM: skipping it beats dropping the batch
    raise KVEventDecodeError("event tag must be a string")


def decode_batch(payload: bytes) -> KVEventBatch:
    """Decode one payload frame; unknown fields and event kinds are skipped."""
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # msgpack raises a zoo of types for malformed input
        raise KVEventDecodeError(f"payload is not msgpack: {exc}") from exc
    if not isinstance(raw, list) or len(raw) < 2:
        raise KVEventDecodeError("an EventBatch must be an array [ts, events, dp_rank]")
    ts, events = raw[0], raw[1]
    if type(ts) not in (float, int) or not isinstance(events, list):
        raise KVEventDecodeError("an EventBatch must start with a number and an event array")
    dp_rank = _opt_int(raw[2] if len(raw) > 2 else None, "data_parallel_rank")
    decoded = tuple(e for e in map(_decode_event, events) if e is not None)
    return KVEventBatch(ts=float(ts), events=decoded, dp_rank=dp_rank)


# -- ZMQ frames -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EventMessage:
    """One published or replayed batch, still encoded."""

    seq: int
    payload: bytes
    topic: str = ""


def is_bind_endpoint(endpoint: str) -> bool:
    """vLLM's ``_is_bind_endpoint``: wildcard, IPv6 or local transports bind, others connect."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def encode_seq(seq: int) -> bytes:
    return seq.to_bytes(SEQ_BYTES, "big")


def decode_seq(frame: bytes) -> int:
    if len(frame) != SEQ_BYTES:
        raise KVEventDecodeError(f"a sequence frame has {SEQ_BYTES} bytes, got {len(frame)}")
    return int.from_bytes(frame, "big")


def event_frames(seq: int, payload: bytes, topic: str = "") -> list[bytes]:
    """The PUB multipart: topic, 8-byte big-endian seq, payload."""
    return [topic.encode(), encode_seq(seq), payload]


def parse_event_frames(frames: Sequence[bytes]) -> EventMessage:
    if len(frames) != 3:
        raise KVEventDecodeError(f"a KV event message has 3 frames, got {len(frames)}")
    topic, seq, payload = frames
    return EventMessage(decode_seq(seq), payload, topic.decode("utf-8", "replace"))


def replay_request_frames(start_seq: int) -> list[bytes]:
    """What a DEALER sends to ask for every buffered batch with ``seq >= start_seq``."""
    return [b"", encode_seq(start_seq)]


def parse_replay_request(frames: Sequence[bytes]) -> tuple[bytes, int] | None:
    """On the ROUTER: ``(identity, start_seq)``, or None for a malformed request (ignored)."""
    if len(frames) != 3 or len(frames[2]) != SEQ_BYTES:
        return None
    return frames[0], decode_seq(frames[2])


def replay_batch_frames(
    identity: bytes, message: EventMessage, legacy: bool = False
) -> list[bytes]:
    """A ROUTER reply carrying one batch: >= 0.26 with a topic frame, <= 0.25 (legacy) without."""
    if legacy:
        return [identity, b"", encode_seq(message.seq), message.payload]
    return [identity, b"", message.topic.encode(), encode_seq(message.seq), message.payload]


def replay_end_frames(identity: bytes, legacy: bool = False) -> list[bytes]:
    if legacy:
        return [identity, b"", END_SEQ, b""]
    return [identity, b"", b"", END_SEQ, b""]


def parse_replay_reply(frames: Sequence[bytes]) -> EventMessage | None:
    """Decode what a DEALER receives from a replay: a batch, or None for the end marker."""
    if not frames or frames[0] != b"":
        raise KVEventDecodeError("a replay reply starts with an empty delimiter frame")
    body = frames[1:]
    if len(body) == 3:  # >= 0.26: topic, seq, payload
        topic, seq, payload = body
    elif len(body) == 2:  # <= 0.25: seq, payload
        topic, (seq, payload) = b"", body
    else:
        raise KVEventDecodeError(f"a replay reply has 3 to 4 frames, got {len(frames)}")
    if seq == END_SEQ:
        return None
    return EventMessage(decode_seq(seq), payload, topic.decode("utf-8", "replace"))
