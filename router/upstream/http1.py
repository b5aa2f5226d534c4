"""A lean HTTP/1.1 client for the relay's hot path: one pooled connection per upstream call.

Why not aiohttp's client: building a ClientRequest, its header multidicts, tracing hooks and
the response object costs more CPU per request than everything else the gateway does, and the
overhead budget (DESIGN.md §7) cannot be met with it. This client does only what the relay
needs: write one pre-formatted request in one `transport.write`, let llhttp (httptools, the
parser uvicorn uses) frame the response, then hand body bytes to the reader as they arrive,
coalescing whatever one `data_received` delivered into one read. Timeouts are one timer per
wait, armed only when the reader actually has to wait.

Connections are kept alive per worker and reused until `keepalive_s` of idleness; a connection
whose response was not read to its end (cancellation, error, timeout), that broke framing, or
whose worker asked to close it is closed, which is also how the worker learns that the client
went away and aborts the sequence.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
from dataclasses import dataclass, field
from typing import cast

import httptools

from router.config.endpoint import Endpoint, parse_endpoint

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
        self._wake()
        if self._buffered > _PAUSE_ABOVE_BYTES and not self._paused and self.transport:
            self._paused = True
            self.transport.pause_reading()

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
            if self._error is not None:
                raise self._error
            if self._state == "eof":
                return b""
            if self._state == "closed":
                raise UpstreamClosed("worker closed the connection mid-response")
            await self._wait(deadline)
        if len(self._body) == 1:
            data = self._body.popleft()
        else:
            data = b"".join(self._body)
            self._body.clear()
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

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


@dataclass(eq=False)
class HostPool:
    endpoint: Endpoint
    ssl: ssl.SSLContext | None = None
    idle: list[Connection] = field(default_factory=list)


class UpstreamClient:
    """Keep-alive connection pools, one per worker base URL."""

    def __init__(self, max_idle_per_host: int = 256, keepalive_s: float = 4.0) -> None:
        self._pools: dict[str, HostPool] = {}
        self._max_idle = max_idle_per_host
        self.keepalive_s = keepalive_s
        """Idle connections older than this are closed, not reused: below the worker's own
        keep-alive timeout (uvicorn's, so vLLM's, is 5 s), a connection is never reused at the
        moment the worker closes it, which would lose a request already written."""
        self._closed = False

    def _pool(
        self, base_url: str, endpoint: Endpoint | None, context: ssl.SSLContext | None
    ) -> HostPool:
        pool = self._pools.get(base_url)
        if pool is None:
            pool = HostPool(endpoint or parse_endpoint(base_url), context)
            self._pools[base_url] = pool
        elif context is not pool.ssl:
            # A reload built a new TLS context: connections made with the old one go.
            for conn in pool.idle:
                conn.close()
            pool.idle.clear()
            pool.ssl = context
        return pool

    async def connect(
        self,
        base_url: str,
        timeout_s: float,
        fresh: bool = False,
        *,
        endpoint: Endpoint | None = None,
        context: ssl.SSLContext | None = None,
    ) -> Connection:
        """A ready connection: an idle pooled one if any (unless `fresh`), else a new one,
        over TLS when the worker's URL is https:// (`context` from its pool's config)."""
        pool = self._pool(base_url, endpoint, context)
        loop = asyncio.get_running_loop()
        oldest = loop.time() - self.keepalive_s
        while pool.idle and not fresh:
            conn = pool.idle.pop()
            if conn.idle_since < oldest:
                # The last one pushed is the newest: every other idle one is older still.
                for stale in (conn, *pool.idle):
                    stale.close()
                pool.idle.clear()
                break
            if conn.reusable and conn.transport is not None and not conn.transport.is_closing():
                return conn
            conn.close()  # bytes arrived while it sat idle, or it closed: out of step
        target = pool.endpoint
        tls = pool.ssl if target.tls else None
        if target.tls and tls is None:
            tls = ssl.create_default_context()
        async with asyncio.timeout(timeout_s):
            _, protocol = await loop.create_connection(
                lambda: Connection(loop),
                target.host,
                target.port,
                ssl=tls,
                server_hostname=target.host if tls is not None else None,
            )
        return protocol

    def release(self, base_url: str, conn: Connection) -> None:
        """Return a connection after its response was read to the end; close it otherwise."""
        pool = self._pools.get(base_url)
        if (
            self._closed
            or pool is None
            or not conn.reusable
            or not conn.finished
            or conn.transport is None
            or conn.transport.is_closing()
            or len(pool.idle) >= self._max_idle
        ):
            conn.close()
            return
        conn._state = "idle"
        conn.idle_since = asyncio.get_running_loop().time()
        pool.idle.append(conn)

    def forget(self, base_url: str) -> None:
        pool = self._pools.pop(base_url, None)
        if pool is not None:
            for conn in pool.idle:
                conn.close()

    def close(self) -> None:
        self._closed = True
        for pool in self._pools.values():
            for conn in pool.idle:
                conn.close()
        self._pools.clear()


def format_request(path: str, host: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
