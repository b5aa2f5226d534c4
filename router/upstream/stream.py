"""One worker's answer from its first byte on, and how its stream reaches the client.

A stream's first block comes from `Answer.next_block` (the HTTP layer writes it with the
response head, in one write). The rest is *pumped*: `Answer.pump` hands the upstream connection
a sink, so each `data_received` of the worker's bytes is cut at event boundaries, read for usage
and `[DONE]`, followed for migration and the answer index, and written to the client's
transport in the same callback. The coroutine wakes only when the answer ends, breaks, idles
past `idle_s` or the client is slower than the worker; not once per chunk (a task step, a
future, a timer and aiohttp's three write layers per chunk were most of the relay's cost).
Blocks are cut at event boundaries so an error event written after a break never lands inside
a half-written one; a break raises `StreamBroken`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from router.domain.policy import Decision
from router.domain.worker import Dispatch, Worker
from router.upstream.answer import AnswerBytes
from router.upstream.call import CallResult, UpstreamCall
from router.upstream.continuation import Transcript
from router.upstream.http1 import Connection
from router.upstream.sse import DONE, EVENT_END, split_usage_event
from router.upstream.upstream_pool import UpstreamClient

MAX_EVENT_BYTES = 1 << 20
"""The longest server-sent event a worker may send (a streamed delta is a few hundred bytes):
a worker that streams without event boundaries is cut off, not buffered."""


class StreamBroken(Exception):
    """The worker's stream ended before its `[DONE]`: reset, idle too long, or cut short."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


class ClientSink(Protocol):
    """Where a pumped stream's blocks go: the client's connection."""

    def write(self, block: bytes) -> None:
        """Write one block now; ConnectionResetError when the client is gone."""

    def full(self) -> bool:
        """Whether the client reads slower than the worker writes (stop reading the worker)."""

    async def drain(self) -> None:
        """Until the client caught up."""


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


class Answer:
    """One worker's answer, from its first byte on. Closing it (exactly once, on every ending)
    ends the worker's in-flight count and returns or drops the connection."""

    __slots__ = (
        "_client",
        "_conn",
        "_dispatch",
        "_failure",
        "_idle_s",
        "_on_close",
        "_pending",
        "_sink",
        "_text",
        "body",
        "call",
        "decision",
        "result",
        "saw_done",
    )

    def __init__(
        self,
        client: UpstreamClient,
        call: UpstreamCall,
        decision: Decision,
        dispatch: Dispatch,
        result: CallResult,
        idle_s: float,
        *,
        conn: Connection | None = None,
        first: bytes = b"",
        body: bytes = b"",
    ) -> None:
        self._client = client
        self.call = call
        self.decision = decision
        self._dispatch = dispatch
        self.result = result
        self._idle_s = idle_s
        self._conn = conn
        self._pending = first
        """Stream bytes received and not yet passed on (a partial event, or the first chunk)."""
        self._text: AnswerBytes | Transcript | None = call.transcript
        if self._text is None and call.collect_answer and conn is not None:
            self._text = AnswerBytes(chat=call.path.endswith("chat/completions"))
        self.body = body
        """A non-streamed answer's complete body."""
        self.saw_done = False
        self._on_close: Callable[[], None] | None = None
        self._sink: ClientSink | None = None
        self._failure: BaseException | None = None
        """What went wrong inside the connection's data callback, raised by `pump`."""

    @property
    def worker(self) -> Worker:
        return self.decision.worker

    def on_close(self, callback: Callable[[], None]) -> None:
        self._on_close = callback

    def _complete_events(self, chunk: bytes) -> bytes:
        """The complete events of what is pending plus `chunk`; the rest stays pending."""
        data = self._pending + chunk if self._pending else chunk
        if data.endswith(EVENT_END):
            self._pending = b""
            return data
        cut = data.rfind(EVENT_END)
        if cut < 0:
            self._pending = data
            data = b""
        else:
            data, self._pending = data[: cut + 2], data[cut + 2 :]
        if len(self._pending) > MAX_EVENT_BYTES:
            raise StreamBroken("event_too_large")
        return data

    def _pass_on(self, data: bytes) -> bytes:
        """Complete events as the client gets them: usage read (and dropped unless the client
        asked for it), `[DONE]` noted, the seam and the call's transform applied."""
        call = self.call
        at = data.find(b'"usage"')
        if at >= 0:
            data, usage, done = split_usage_event(
                data, not call.client_wants_usage, call.cached_override, at
            )
            if usage is not None and call.usage_offset:
                usage.prompt_tokens = max(0, usage.prompt_tokens - call.usage_offset)
                usage.completion_tokens += call.usage_offset
            self.result.usage = usage or self.result.usage
            self.saw_done = self.saw_done or done
        elif data.endswith(DONE):
            self.saw_done = True
        if call.seam is not None:
            data = call.seam(data)
        if self._text is not None:
            self._text.add(data)  # the upstream's OpenAI shape, before transform
        if call.transform is not None:
            data = call.transform(data)
        return data

    def _ended(self) -> None:
        """The body ended: a stream without `[DONE]` was cut short."""
        if not self.saw_done:
            raise StreamBroken("no_done")
        if self._text is not None and self.call.collect_answer:
            self.result.answer = self._text.text()

    async def next_block(self) -> bytes | None:
        """The next complete events for the client (never empty), or None after `[DONE]` and
        the end of the body."""
        conn = self._conn
        assert conn is not None, "next_block is for streamed answers"
        chunk = b""
        while True:
            data = self._complete_events(chunk)
            if data:
                data = self._pass_on(data)
                if data:
                    return data
            try:
                chunk = await conn.read(_loop_time() + self._idle_s)
            except TimeoutError:
                raise StreamBroken("idle_timeout") from None
            except ConnectionError:
                raise StreamBroken("stream_broken") from None
            if not chunk:
                self._ended()
                return None

    async def pump(self, sink: ClientSink) -> None:
        """Relay the rest of the stream to `sink` from the connection's data callback until
        the answer ended (returns) or broke (raises StreamBroken; ConnectionResetError when
        the client went away)."""
        conn = self._conn
        assert conn is not None, "pump is for streamed answers"
        self._sink = sink
        conn.sink = self._feed
        try:
            self._feed(conn.take_body())  # what came after the first block, before the pump
            while True:
                if self._failure is not None:
                    raise self._failure
                if conn.finished:
                    self._ended()
                    return
                if conn.reading_paused:
                    await sink.drain()
                    conn.resume_reading()
                    continue
                idle_until = conn.last_data_at + self._idle_s
                try:
                    await conn.wait_event(idle_until)
                except TimeoutError:
                    if _loop_time() - conn.last_data_at >= self._idle_s:
                        raise StreamBroken("idle_timeout") from None
                except ConnectionError:
                    if self._failure is None:
                        raise StreamBroken("stream_broken") from None
        finally:
            conn.sink = None
            conn.resume_reading()  # a connection kept alive must hear its worker close it
            self._sink = None

    def _feed(self, chunk: bytes) -> None:
        """The connection's data callback while pumping: never raises (a failure is kept for
        `pump` and wakes it)."""
        sink = self._sink
        conn = self._conn
        if sink is None or conn is None or self._failure is not None:
            return
        try:
            data = self._complete_events(chunk)
            if data:
                data = self._pass_on(data)
                if data:
                    sink.write(data)
                    if sink.full():
                        # The client is slower than the worker: stop reading the worker until
                        # the pump saw the client catch up.
                        conn.pause_reading()
                        conn.interrupt()
        except Exception as exc:  # a callback must not raise into the protocol: pump raises it
            self._failure = exc
            conn.interrupt()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._client.release(self.worker.url, conn)
        self._dispatch.end()
        callback, self._on_close = self._on_close, None
        if callback is not None:
            callback()
