"""Follows one vLLM worker's KV event stream without losing track of its cache.

A ZMQ SUB socket receives the batches; a DEALER asks the worker's replay ROUTER for batches the
SUB missed (``reference/vllm-interface.md`` §1.5, both reply shapes). ``items()`` yields, in
order, ``Batch`` (apply it) and ``Resync`` (forget the worker's blocks: what follows rebuilds them).
The seq rules: the next expected seq is applied; a seq already applied through a replay is a
duplicate; a jump is a gap, filled by a replay if the worker's buffer still reaches back to it;
a seq at or below the last one seen live means the publisher restarted (vLLM counts from 0 per
process). When a gap cannot be filled (no replay endpoint, buffer too short, no answer) the
agent resyncs and applies whatever contiguous tail it got: applying any tail of the history to
an empty view gives a subset of the true view, which only costs cache hits, never wrong routes.
At start the same applies: a replay from 0 rebuilds as much of the worker's state as it buffers.
While the SUB is quiet, a probe replays from the last applied batch, which must come back
unchanged: that catches lost trailing batches and a restart whose new batches the SUB missed.
One subscriber follows one publisher (one DP rank); a DP fleet runs one agent per rank.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from router.vllm_wire.kv_events import (
    EventMessage,
    KVEventBatch,
    KVEventDecodeError,
    decode_batch,
    is_bind_endpoint,
    parse_event_frames,
    parse_replay_reply,
    replay_request_frames,
)

log = logging.getLogger("prefix_worker.agent.kv_events")

SUB_HWM = 100_000  # as vLLM's PUB side: a slow agent loses batches only beyond this


@dataclass(frozen=True, slots=True)
class Batch:
    seq: int
    batch: KVEventBatch


@dataclass(frozen=True, slots=True)
class Resync:
    """The worker's blocks are unknown from here on; drop them and rebuild from what follows."""

    reason: str


SubscriberItem = Batch | Resync


@dataclass(slots=True)
class SubscriberStats:
    received: int = 0  # live messages
    applied: int = 0  # batches yielded, live or replayed
    replayed: int = 0  # batches obtained through a replay
    probes: int = 0  # replays asked while the SUB was quiet
    gaps: int = 0
    restarts: int = 0
    resyncs: int = 0
    decode_errors: int = 0
    reasons: list[str] = field(default_factory=list)


class KVEventSubscriber:
    """SUB + replay client for one worker; ``start`` then iterate ``items()``; ``close`` at end."""

    def __init__(
        self,
        endpoint: str,
        replay_endpoint: str | None = None,
        topic: str = "",
        replay_timeout_s: float = 2.0,
        probe_s: float = 2.0,
    ) -> None:
        self._endpoint = endpoint
        self._replay_endpoint = replay_endpoint
        self._topic = topic
        self._replay_timeout_ms = int(replay_timeout_s * 1000)
        self._probe_ms = int(probe_s * 1000)
        self._replay_failing = False
        self._context: zmq.asyncio.Context | None = None
        self._sub: zmq.asyncio.Socket | None = None
        self._dealer: zmq.asyncio.Socket | None = None
        self._expected: int | None = None  # next seq to apply; None: accept whatever comes
        self._last_live: int | None = None  # last seq the SUB delivered
        self._last_payload = b""  # of the last applied batch: a probe checks the worker has it
        self.stats = SubscriberStats()
        self.following = asyncio.Event()  # set once the start-up replay is done

    def start(self) -> None:
        context = zmq.asyncio.Context()
        self._context = context
        sub = context.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, SUB_HWM)
        sub.setsockopt(zmq.SUBSCRIBE, self._topic.encode())
        # Mirror vLLM's rule: a worker told to connect out (tcp://collector:5557) needs us bound.
        if is_bind_endpoint(self._endpoint):
            sub.bind(self._endpoint)
        else:
            sub.connect(self._endpoint)
        self._sub = sub

    def close(self) -> None:
        self._drop_dealer()
        if self._sub is not None:
            self._sub.close(linger=0)
            self._sub = None
        if self._context is not None:
            self._context.destroy(linger=0)  # never blocks, whatever is still open
            self._context = None

    async def items(self) -> AsyncIterator[SubscriberItem]:
        """Every change to apply, in order, forever (until the task is cancelled)."""
        if self._sub is None:
            raise RuntimeError("start() the subscriber first")
        yield self._resync("agent start")
        async for item in self._catch_up(0, fresh=True):
            yield item
        self.following.set()
        sub = self._sub
        while True:
            if not await sub.poll(timeout=self._probe_ms):
                async for item in self._probe():
                    yield item
                continue
            frames = await sub.recv_multipart()
            try:
                message = parse_event_frames(frames)
            except KVEventDecodeError as exc:
                self.stats.decode_errors += 1
                log.warning("ignoring a malformed KV event message: %s", exc)
                continue
            self.stats.received += 1
            async for item in self._on_live(message):
                yield item

    async def _on_live(self, message: EventMessage) -> AsyncIterator[SubscriberItem]:
        seq, last_live = message.seq, self._last_live
        self._last_live = seq
        restarted = last_live is not None and seq <= last_live
        if restarted:
            self.stats.restarts += 1
            yield self._resync(f"worker restarted (seq {seq} after {last_live})")
            self._expected = 0
        expected = self._expected
        if expected is not None and seq < expected:
            return  # already applied through a replay
        if expected is not None and seq > expected:
            self.stats.gaps += 1
            async for item in self._catch_up(expected, fresh=restarted):
                yield item
            if self._expected is not None and seq < self._expected:
                return  # the replay reached this batch
            if self._expected is not None and seq > self._expected:
                yield self._resync(f"replay did not reach seq {seq}")
        decoded = self._decode(message)
        if decoded is not None:
            yield decoded

    async def _probe(self) -> AsyncIterator[SubscriberItem]:
        """While the SUB is quiet, check with the replay buffer that nothing was missed.

        The last batches of a burst can be lost (slow joiner, HWM drops) and no later seq would
        reveal it; a restarted worker whose new batches the SUB missed looks just as quiet. So
        ask for everything from the last applied batch: it must come back first, byte for byte.
        """
        expected = self._expected
        if expected is None or self._replay_endpoint is None:
            return
        self.stats.probes += 1
        start = max(expected - 1, 0)
        replies = await self._replay(start)
        if replies is None:
            return  # the replay socket is down: nothing learned
        if expected > 0 and (
            not replies or replies[0].seq != start or replies[0].payload != self._last_payload
        ):
            if not replies or replies[0].seq == start:
                # The worker no longer has the batch we applied last: it restarted.
                self.stats.restarts += 1
                yield self._resync("worker restarted (its replay lost our last batch)")
                self._last_live = None
                async for item in self._catch_up(0, fresh=True):
                    yield item
                return
            # More than its buffer was published since our last batch: keep the tail.
            yield self._resync(f"replay starts at seq {replies[0].seq}, not {start}")
            self._expected = None
        for item in self._apply_replies(replies, start if expected == 0 else expected):
            yield item

    async def _catch_up(self, start: int, fresh: bool = False) -> AsyncIterator[SubscriberItem]:
        """Apply buffered batches from ``start``; resync first if the buffer does not reach it.

        ``fresh`` says the view was just dropped, so a short buffer needs no second resync.
        """
        replies = await self._replay(start)
        if replies is None:
            if not fresh:
                yield self._resync(f"batches from seq {start} lost and no replay")
            self._expected = None
            return
        if replies and replies[0].seq != start:
            # The worker's buffer no longer holds `start`: keep its contiguous tail.
            if not fresh:
                yield self._resync(f"replay starts at seq {replies[0].seq}, not {start}")
            self._expected = None
        else:
            self._expected = start
        for item in self._apply_replies(replies, start):
            yield item

    def _apply_replies(self, replies: list[EventMessage], start: int) -> Iterator[SubscriberItem]:
        for message in replies:
            if message.seq < start:
                continue
            if self._expected is not None and message.seq != self._expected:
                if message.seq < self._expected:
                    continue
                yield self._resync(f"replay skipped from {self._expected}")
            self.stats.replayed += 1
            decoded = self._decode(message)
            if decoded is not None:
                yield decoded

    def _decode(self, message: EventMessage) -> Batch | None:
        self._expected = message.seq + 1
        self._last_payload = message.payload
        try:
            batch = decode_batch(message.payload)
        except KVEventDecodeError as exc:
            # Replaying would return the same bytes; skip the batch and keep following.
            self.stats.decode_errors += 1
            log.warning("ignoring undecodable KV event batch %d: %s", message.seq, exc)
            return None
        self.stats.applied += 1
        return Batch(message.seq, batch)

    def _resync(self, reason: str) -> Resync:
        self.stats.resyncs += 1
        self.stats.reasons.append(reason)
        if len(self.stats.reasons) > 100:
            del self.stats.reasons[0]
        log.info("resyncing the KV view: %s", reason)
        return Resync(reason)

    async def _replay(self, start: int) -> list[EventMessage] | None:
        """Buffered batches with seq >= start, or None when there is no usable replay."""
        if self._replay_endpoint is None or self._context is None:
            return None
        if self._dealer is None:
            dealer = self._context.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(self._replay_endpoint)
            self._dealer = dealer
        dealer = self._dealer
        await dealer.send_multipart(replay_request_frames(start))
        out: list[EventMessage] = []
        while True:
            if not await dealer.poll(timeout=self._replay_timeout_ms):
                # Late replies would be mistaken for the next replay's: start a fresh socket.
                self._replay_failed(f"no answer from seq {start} in time")
                return None
            try:
                reply = parse_replay_reply(await dealer.recv_multipart())
            except KVEventDecodeError as exc:
                self._replay_failed(f"malformed reply: {exc}")
                return None
            if reply is None:
                if self._replay_failing:
                    log.info("KV event replay answers again")
                    self._replay_failing = False
                return out
            if reply.seq >= start:
                out.append(reply)

    def _replay_failed(self, problem: str) -> None:
        if not self._replay_failing:  # once per outage: probes retry every few seconds
            log.warning("KV event replay from %s failed: %s", self._replay_endpoint, problem)
            self._replay_failing = True
        self._drop_dealer()

    def _drop_dealer(self) -> None:
        if self._dealer is not None:
            self._dealer.close(linger=0)
            self._dealer = None
