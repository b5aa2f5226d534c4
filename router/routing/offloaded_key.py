"""Precise keys of long prompts computed in a helper process, off the event loop.

Tokenizing a cold 16k-token prompt and hashing its 1000 blocks takes 7-10 ms of Python on the
dev box (`prefix-router bench key-stall` measures it), and on the event loop that is
7-10 ms during which no other stream moves. Threads would not help: the hashing holds the GIL
(hashlib releases it only for inputs far longer than a pickled block). So a prompt whose routing
key is longer than `inline_chars` is keyed by one helper process with its own `PreciseKeyer` (and
its own memo of hot prefixes); the loop only pickles the body over and the hashes back (tens of
microseconds). Short prompts stay inline, where the round trip would cost more than the work.
The helper starts on first use ("spawn": never a fork of a process running an event loop); if it
dies, the next long prompt starts another, and the one in flight is keyed inline.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from typing import Any

from router.config import PreciseConfig
from router.domain.policy import PreciseKey
from router.routing.precise_key import PreciseKeyer
from router.vllm_wire.block_hash import LoraKey

log = logging.getLogger("prefix_router.precise")

INLINE_CHARS = 8192
"""Routing keys up to this long (~2k tokens, under a millisecond to key) are keyed inline."""

_HELPER_KEYER: PreciseKeyer | None = None


def _start_helper(config: dict[str, Any]) -> None:
    global _HELPER_KEYER  # the helper process's own keyer, built once when it starts
    _HELPER_KEYER = PreciseKeyer(PreciseConfig.model_validate(config))


def _key_in_helper(body: Mapping[str, Any], chat: bool, lora: LoraKey | None) -> PreciseKey | None:
    assert _HELPER_KEYER is not None, "the helper process was started without its keyer"
    return _HELPER_KEYER.key(body, chat, lora)


class OffloadedKeyer:
    """A pool's precise keyer: short prompts inline, long ones in the helper process."""

    def __init__(self, config: PreciseConfig, inline_chars: int = INLINE_CHARS) -> None:
        self.config = config
        self._inline = PreciseKeyer(config)
        self._inline_chars = inline_chars
        self._pool: ProcessPoolExecutor | None = None

    def key(
        self, body: Mapping[str, Any], chat: bool, lora: LoraKey | None = None
    ) -> PreciseKey | None:
        return self._inline.key(body, chat, lora)

    async def key_async(
        self, body: Mapping[str, Any], chat: bool, key_chars: int, lora: LoraKey | None = None
    ) -> PreciseKey | None:
        if key_chars <= self._inline_chars:
            return self._inline.key(body, chat, lora)
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=1,
                mp_context=get_context("spawn"),
                initializer=_start_helper,
                initargs=(self.config.model_dump(),),
            )
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, _key_in_helper, body, chat, lora)
        except BrokenProcessPool:
            log.warning("the precise-key helper process died; keying this prompt inline")
            self._pool = None
            return self._inline.key(body, chat, lora)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
