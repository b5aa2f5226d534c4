"""A lean HTTP/1.1 client for the relay's hot path: one pooled connection per upstream call.

Why not aiohttp's client: building a ClientRequest, its header multidicts, tracing hooks and
the response object costs more CPU per request than everything else the gateway does, and the
overhead budget (DESIGN.md §7) cannot be met with it. This client does only what the relay
needs: write one pre-formatted request in one `transport.write`, parse the status line and
headers once, then hand body bytes to the reader as they arrive (Content-Length or chunked),
coalescing whatever one `data_received` delivered into one read. Timeouts are one timer per
wait, armed only when the reader actually has to wait.

Connections are kept alive per worker and reused; a connection whose response was not read to
its end (cancellation, error, timeout) is closed, which is also how the worker learns that the
client went away and aborts the sequence.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
from dataclasses import dataclass, field
from typing import cast

from router.config.endpoint import Endpoint, parse_endpoint

_HEAD_END = b"\r\n\r\n"
_CRLF = b"\r\n"
_MAX_HEAD_BYTES = 64 * 1024
_PAUSE_ABOVE_BYTES = 1 << 20


class UpstreamProtocolError(ConnectionError):
    """The worker's bytes are not HTTP/1.1 we can read."""


class UpstreamClosed(ConnectionError):
    """The connection ended before the response did."""


@dataclass(slots=True)
class Head:
    status: int
    headers: dict[str, str]


class Connection(asyncio.Protocol):
    """One keep-alive connection; the parser is a small state machine fed by data_received."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._state = "idle"  # idle | head | length | chunk_size | chunk_data | chunk_end | eof
        self._remaining = 0
        self._head: Head | None = None
        self._body: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self.reusable = False
        self.used = 0
        self.received_any = False

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
        if self._state == "until_close":
            self._state = "eof"  # a body without length or chunking ends with the connection
        elif self._state not in ("idle", "eof"):
            if self._error is None:
                self._error = exc or UpstreamClosed("worker closed the connection mid-response")
            self._state = "closed"
        else:
            self._state = "closed" if self._state == "idle" else "eof"
        self._wake()

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        if self._state in ("idle", "closed", "eof"):
            # Bytes nobody asked for: the connection is out of step; never reuse it.
            self.reusable = False
            return
        self._buf += data
        try:
            self._parse()
        except UpstreamProtocolError as exc:
            self._error = exc
            self.reusable = False
            if self.transport is not None:
                self.transport.close()
        self._wake()
        if self._buffered > _PAUSE_ABOVE_BYTES and not self._paused and self.transport:
            self._paused = True
            self.transport.pause_reading()

    # -- parser -------------------------------------------------------------------------------

    def _parse(self) -> None:
        buf = self._buf
        while buf:
            state = self._state
            if state == "head":
                end = buf.find(_HEAD_END)
                if end < 0:
                    if len(buf) > _MAX_HEAD_BYTES:
                        raise UpstreamProtocolError("response head too large")
                    return
                self._start_body(bytes(buf[:end]))
                del buf[: end + 4]
            elif state == "until_close":
                self._push(bytes(buf))
                buf.clear()
            elif state == "length":
                take = min(self._remaining, len(buf))
                self._push(bytes(buf[:take]))
                del buf[:take]
                self._remaining -= take
                if self._remaining == 0:
                    self._finish()
            elif state == "chunk_size":
                end = buf.find(_CRLF)
                if end < 0:
                    return
                try:
                    size = int(bytes(buf[:end]).split(b";", 1)[0], 16)
                except ValueError:
                    raise UpstreamProtocolError("bad chunk size") from None
                del buf[: end + 2]
                if size == 0:
                    self._state = "trailers"
                else:
                    self._remaining = size
                    self._state = "chunk_data"
            elif state == "chunk_data":
                take = min(self._remaining, len(buf))
                self._push(bytes(buf[:take]))
                del buf[:take]
                self._remaining -= take
                if self._remaining == 0:
                    self._state = "chunk_end"
            elif state == "chunk_end":
                if len(buf) < 2:
                    return
                del buf[:2]
                self._state = "chunk_size"
            elif state == "trailers":
                end = buf.find(_CRLF)
                if end < 0:
                    return
                del buf[: end + 2]
                if end == 0:
                    self._finish()
            else:
                self.reusable = False
                return

    def _start_body(self, head: bytes) -> None:
        lines = head.split(_CRLF)
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise UpstreamProtocolError("not an HTTP/1.x response")
        try:
            status = int(parts[1])
        except ValueError:
            raise UpstreamProtocolError("bad status code") from None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if sep:
                headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        self._head = Head(status, headers)
        keep_alive = headers.get("connection", "").lower() != "close"
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._state = "chunk_size"
            self.reusable = keep_alive
        elif "content-length" in headers:
            try:
                self._remaining = int(headers["content-length"])
            except ValueError:
                raise UpstreamProtocolError("bad content-length") from None
            self.reusable = keep_alive
            self._state = "length"
            if self._remaining == 0:
                self._finish()
        else:
            self._state = "until_close"
            self.reusable = False

    def _push(self, data: bytes) -> None:
        if data:
            self._body.append(data)
            self._buffered += len(data)

    def _finish(self) -> None:
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

    def send(self, request: bytes) -> None:
        assert self.transport is not None
        self._state = "head"
        self._head = None
        self._error = None
        self.reusable = False
        self.received_any = False
        self.used += 1
        self.transport.write(request)

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
    def went_stale(self) -> bool:
        """A reused connection that ended before any byte of the answer: the worker closed it
        while it sat idle in the pool, so the request never reached it."""
        return self.used > 1 and not self.received_any

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

    def __init__(self, max_idle_per_host: int = 256) -> None:
        self._pools: dict[str, HostPool] = {}
        self._max_idle = max_idle_per_host
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
        while pool.idle and not fresh:
            conn = pool.idle.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                return conn
        loop = asyncio.get_running_loop()
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
