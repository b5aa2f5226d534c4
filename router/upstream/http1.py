"""A lean HTTP/1.1 client for the relay's hot path: one pooled connection per upstream call.

Why not aiohttp's client: building a ClientRequest, its header multidicts, tracing hooks and
the response object costs more CPU per request than everything else the gateway does, and the
overhead budget (DESIGN.md §7) cannot be met with it. This client does only what the relay
needs: write one pre-formatted request in one `transport.write`, let llhttp (httptools, the
parser uvicorn uses) frame the response, then hand body bytes to the reader as they arrive,
coalescing whatever one `data_received` delivered into one read, or, while a stream is pumped
(`stream.Answer.pump`), to its sink inside `data_received` itself. Timeouts are one timer per
wait, armed only when the reader actually has to wait.

Connections are kept alive per worker (`upstream_pool`) until `keepalive_s` of idleness; a
connection whose response was not read to its end (cancellation, error, timeout), that broke
framing, or whose worker asked to close it is closed, which is also how the worker learns that
the client went away and aborts the sequence.
"""

from __future__ import annotations

import asyncio
import collections
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import httptools

_MAX_OVERHEAD_BYTES = 64 * 1024
"""Bytes the worker may send without any progress of the response (a head, a chunk-size line, a
trailer section): a worker that sends endless headers or chunk extensions is cut off here."""
_MAX_HEADERS = 100
_PAUSE_ABOVE_BYTES = 1 << 20


class UpstreamProtocolError(ConnectionError):
    """The worker's bytes are not HTTP/1.1 we can read."""


class UpstreamClosed(ConnectionError):
    """The connection ended before the response did."""


@dataclass(slots=True)
class Head:
    status: int


class Connection(asyncio.Protocol):
    """One keep-alive connection; llhttp (httptools) frames the responses fed by data_received.

    llhttp is strict where a hand-written parser is not: one non-negative decimal
    Content-Length (duplicates are an error), never with Transfer-Encoding, chunk sizes of hex
    digits only with each chunk's CRLF checked, no bare LF, no obsolete line folding. On top of
    it: Transfer-Encoding must be exactly `chunked`, interim 1xx heads are skipped, a head may
    have at most 100 headers, the bytes without progress (head, chunk-size lines, trailers) are
    bounded, and a reset before a close-delimited body ended is an error, not its end. Any
    violation closes the connection; one never goes back to the pool unless its response was
    read to the end, llhttp says keep-alive (HTTP/1.1 and no `close` token), and no byte came
    after it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._state = "idle"  # idle | head | body | until_close | eof | closed
        self._status = 0
        self._encoding: bytes | None = None
        """Transfer-Encoding of the response being read (repeated headers joined)."""
        self._has_length = False
        self._header_count = 0
        self._head: Head | None = None
        self._body: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._stalled = 0
        self._progress = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self.reusable = False
        self.used = 0
        self.received_any = False
        self.idle_since = 0.0
        self.sink: Callable[[bytes], None] | None = None
        """Set while a stream is pumped: body bytes go to it from `data_received` (which then
        wakes the reader only when the response ended or failed), not to a reader's `read`."""
        self.last_data_at = 0.0
        """Loop time of the last bytes received."""

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        self.transport = None
        if self._state == "until_close" and exc is None:
            self._state = "eof"  # a body without length or chunking ends with the connection
        elif self._state in ("head", "body", "until_close"):
            if self._error is None:
                self._error = exc or UpstreamClosed("worker closed the connection mid-response")
            self._state = "closed"
        elif self._state == "idle":
            self._state = "closed"
        self._wake()

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        self.last_data_at = self._loop.time()
        if self._state not in ("head", "body", "until_close"):
            # Bytes nobody asked for: the connection is out of step; never reuse it.
            self.reusable = False
            return
        self._progress = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self._state == "eof":
                self.reusable = False  # bytes after a complete response: discard it after
            else:
                cause = exc.__context__  # a callback's own verdict, when one raised
                self._fail(
                    cause
                    if isinstance(cause, UpstreamProtocolError)
                    else UpstreamProtocolError(f"malformed response: {exc}")
                )
        else:
            self._stalled = 0 if self._progress else self._stalled + len(data)
            if self._stalled > _MAX_OVERHEAD_BYTES and self._state != "eof":
                self._fail(UpstreamProtocolError("response framing too large"))
        sink = self.sink
        if sink is not None:
            if self._body:
                sink(self.take_body())
            if self._state not in ("eof", "closed") and self._error is None:
                return  # nothing for the pump to wake up for
        self._wake()
        if self._buffered > _PAUSE_ABOVE_BYTES:
            self.pause_reading()

    def _fail(self, error: UpstreamProtocolError) -> None:
        self._error = error
        self._state = "closed"
        self.reusable = False
        if self.transport is not None:
            self.transport.close()

    # -- llhttp callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._state == "eof":
            raise UpstreamProtocolError("a second response to one request")
        self._encoding = None
        self._has_length = False
        self._header_count = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > _MAX_HEADERS:
            raise UpstreamProtocolError("too many response headers")
        # Only what framing needs: the relay reads no other response header.
        key = name.lower()
        if key == b"transfer-encoding":
            self._encoding = value if self._encoding is None else self._encoding + b", " + value
        elif key == b"content-length":
            self._has_length = True

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            return  # an interim answer (100 Continue, 103 Early Hints): the real one follows
        encoding = self._encoding
        if encoding is not None and encoding.strip().lower() != b"chunked":
            raise UpstreamProtocolError(f"unsupported Transfer-Encoding {encoding[:40]!r}")
        self._progress = True
        self._head = Head(status)
        delimited = encoding is not None or self._has_length or status in (204, 304)
        self._state = "body" if delimited else "until_close"

    def on_body(self, body: bytes) -> None:
        self._progress = True
        self._body.append(body)
        self._buffered += len(body)

    def on_chunk_complete(self) -> None:
        self._progress = True

    def on_message_complete(self) -> None:
        if self._head is None:
            return  # the end of a 1xx head
        self._progress = True
        self.reusable = self._parser.should_keep_alive()
        self._state = "eof"

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self, deadline: float | None) -> None:
        waiter = self._loop.create_future()
        self._waiter = waiter
        timer = None
        if deadline is not None:
            timer = self._loop.call_at(deadline, _expire, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    # -- the caller's side --------------------------------------------------------------------

    def send(self, request: bytes) -> bool:
        """Write the request in one write; False, with nothing written, when the connection
        is already closing (the worker closed it while it sat idle: sending again elsewhere
        costs the worker nothing)."""
        transport = self.transport
        if transport is None or transport.is_closing() or self._state != "idle":
            return False
        self._state = "head"
        self._head = None
        self._error = None
        self._stalled = 0
        self.reusable = False
        self.received_any = False
        self.used += 1
        transport.write(request)
        return True

    async def read_head(self, deadline: float | None) -> Head:
        while self._head is None:
            if self._error is not None:
                raise self._error
            if self._state == "closed":
                raise UpstreamClosed("worker closed the connection before answering")
            await self._wait(deadline)
        return self._head

    async def read(self, deadline: float | None) -> bytes:
        """The next body bytes (everything buffered, joined); b"" at the end of the body."""
        while not self._body:
            self._raise_if_failed()
            if self._state == "eof":
                return b""
            await self._wait(deadline)
        data = self.take_body()
        self.resume_reading()
        return data

    def take_body(self) -> bytes:
        """Whatever body bytes are buffered (b"" if none), without waiting."""
        if not self._body:
            return b""
        data = self._body.popleft() if len(self._body) == 1 else b"".join(self._body)
        self._body.clear()
        self._buffered = 0
        return data

    async def wait_event(self, deadline: float | None) -> None:
        """For a pumped stream: until the response ended, failed (raises, as `read`), or
        `interrupt()` was called; TimeoutError at `deadline`."""
        self._raise_if_failed()
        if self._state != "eof":
            await self._wait(deadline)
            self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error
        if self._state == "closed":
            raise UpstreamClosed("worker closed the connection mid-response")

    def interrupt(self) -> None:
        """Wake whoever waits on this connection (the pump's sink failed or filled up)."""
        self._wake()

    @property
    def reading_paused(self) -> bool:
        return self._paused

    def pause_reading(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    @property
    def finished(self) -> bool:
        return self._state == "eof" and not self._body

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.close()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


def format_request(path: str, host: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
