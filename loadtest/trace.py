"""Mooncake-format traces (FAST'25) as workloads of text whose shared blocks are shared words.

A trace is JSON Lines, one request a line: `timestamp` (ms since the trace began), `input_length`
and `output_length` (tokens) and `hash_ids`, one id per 512-token block of the prompt, where equal
ids at equal positions mean equal prefixes. Each id becomes a fixed run of words (drawn from a
generator seeded by the id, so equal ids give equal text and distinct ids never share a word
boundary by chance: each run opens with a tag naming its id). A trace token becomes 1/`scale`
word, so a 16k-token prompt at scale 16 is 1000 words (one simulated token each); the prompt's
last block is cut to the length the trace gives. Words are `chars_per_token - 1` letters plus a
space, so the text's characters per token can be set (the simulated worker's tokenizer counts
one token per word, whatever its length). `speedup` divides the trace's clock; `offset` and
`count` pick a window; `sessions` keeps that share of the trace's prefix roots (all requests whose
first block id hashes into the share), which thins the load while keeping each root's reuse.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.workloads import Script, Turn, Workload

TRACE_BLOCK_TOKENS = 512
"""Tokens per `hash_ids` entry in the Mooncake format."""


@dataclass(frozen=True)
class TraceSpec:
    path: str
    scale: int = 16
    """Trace tokens per word (a trace token becomes 1/scale word)."""
    chars_per_token: int = 4
    speedup: float = 1.0
    offset: int = 0
    count: int = 800
    sessions: float = 1.0
    """Share of prefix roots kept (1.0: every request of the window)."""
    seed: int = 1


def read_trace(path: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with Path(path).open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            for field in ("timestamp", "input_length", "output_length", "hash_ids"):
                if field not in row:
                    raise ValueError(f"{path}:{n}: no `{field}`")
            rows.append(row)
    return rows


class BlockText:
    """The words of each trace block id, made once and shared by every request using it."""

    def __init__(self, words_per_block: int, chars_per_token: int, seed: int) -> None:
        self._words = words_per_block
        self._letters = max(1, chars_per_token - 1)
        self._seed = seed
        self._made: dict[int, list[str]] = {}

    def words(self, block_id: int) -> list[str]:
        made = self._made.get(block_id)
        if made is None:
            rng = random.Random(self._seed * 1_000_003 + block_id)
            tag = f"b{block_id}".ljust(self._letters, "x")
            body = [
                "".join(rng.choices(string.ascii_lowercase, k=self._letters))
                for _ in range(self._words - 1)
            ]
            made = self._made[block_id] = [tag, *body]
        return made


def _kept(root: int, share: float, seed: int) -> bool:
    if share >= 1.0:
        return True
    # A cryptographic digest: CRC-32 is linear, so two roots' keep decisions would be tied.
    digest = hashlib.blake2b(f"{seed}:{root}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < share


def trace_workload(spec: TraceSpec) -> Workload:
    rows = read_trace(spec.path)[spec.offset : spec.offset + spec.count]
    if not rows:
        raise ValueError(f"{spec.path}: the window (offset {spec.offset}) holds no request")
    words_per_block = max(1, TRACE_BLOCK_TOKENS // spec.scale)
    text = BlockText(words_per_block, spec.chars_per_token, spec.seed)
    start_ms = rows[0]["timestamp"]
    scripts: list[Script] = []
    distinct: set[int] = set()
    largest = 0
    for row in rows:
        ids: list[int] = row["hash_ids"]
        if not ids or not _kept(ids[0], spec.sessions, spec.seed):
            continue
        total_words = max(1, math.ceil(row["input_length"] / spec.scale))
        prompt: list[str] = []
        for block_id in ids:
            prompt.extend(text.words(block_id)[: total_words - len(prompt)])
            if len(prompt) >= total_words:
                break
        distinct.update(ids)
        max_tokens = max(1, math.ceil(row["output_length"] / spec.scale))
        largest = max(largest, len(prompt) + max_tokens)
        start_s = (row["timestamp"] - start_ms) / 1000.0 / spec.speedup
        scripts.append(Script(start_s, " ".join(prompt), (Turn("go", max_tokens),)))
    if not scripts:
        raise ValueError("session sampling kept no request of the window")
    span_s = scripts[-1].start_s
    return Workload(
        name="trace",
        description=(
            f"{Path(spec.path).name} requests {spec.offset}..{spec.offset + len(rows) - 1}"
            f" ({len(scripts)} kept, roots share {spec.sessions:g}), 1 word = {spec.scale} trace"
            f" tokens, {spec.chars_per_token} chars/token, {span_s:.0f}s ({spec.speedup:g}x)"
        ),
        scripts=tuple(scripts),
        working_set_tokens=len(distinct) * words_per_block,
        largest_request_tokens=largest,
    )


TRACE_FLEET_SHARE = 0.3
"""Default fleet KV as a share of a trace window's distinct blocks: below the working set."""


def add_trace_arguments(parser: argparse.ArgumentParser) -> None:
    t = TraceSpec(path="")
    parser.add_argument("--trace", metavar="FILE", help="replay a Mooncake-format JSONL trace")
    parser.add_argument("--trace-scale", type=int, default=t.scale, help="trace tokens per word")
    parser.add_argument(
        "--chars-per-token", type=int, default=t.chars_per_token, help="word length + 1 space"
    )
    parser.add_argument(
        "--trace-speedup", type=float, default=t.speedup, help="divide the trace's clock"
    )
    parser.add_argument("--trace-offset", type=int, default=t.offset, help="first request")
    parser.add_argument("--trace-count", type=int, default=t.count, help="requests in the window")
    parser.add_argument(
        "--trace-sessions", type=float, default=t.sessions, help="share of prefix roots kept"
    )


def trace_spec(args: argparse.Namespace) -> TraceSpec:
    return TraceSpec(
        path=args.trace,
        scale=args.trace_scale,
        chars_per_token=args.chars_per_token,
        speedup=args.trace_speedup,
        offset=args.trace_offset,
        count=args.trace_count,
        sessions=args.trace_sessions,
        seed=args.seed,
    )
