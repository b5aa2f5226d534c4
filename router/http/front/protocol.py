"""One client connection on the front: HTTP/1.1 framing by httptools, the model endpoints
served here, every other request handed to aiohttp with the connection.

The front exists for the cost of a request (DESIGN §7): aiohttp's server spends more per request
than the whole relay behind it, so the two model endpoints are parsed, answered and kept alive
here. Anything else (other paths and methods, HTTP/1.0, upgrades) goes to aiohttp's own
protocol, which then owns the connection: the bytes of the request from its first one are
replayed into it. A request can be handed over only when it starts a read (the bytes before it
were another request's, wholly consumed); one pipelined behind a served request in the same
read is refused with a 400 instead, a case no common client produces.

Requests on a connection are answered in order, one at a time; a pipelined one waits in a short
queue (reading pauses when it grows). A connection idle past `keepalive_s` (no request in
flight, no byte received) is closed. When the client goes away, the request it waited for is
cancelled, as aiohttp does.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import NamedTuple

import httptools

from router.errors import GatewayError, InvalidRequest
from router.http.body import too_large
from router.http.context import new_request_id
from router.http.front.exchange import Incoming, Written, error_bytes

log = logging.getLogger("prefix_router.http")

MAX_HEAD_BYTES = 64 * 1024
"""A request head (request line and headers) above this is refused with 431."""
MAX_QUEUED = 8
"""Pipelined requests waiting on one connection before it stops reading."""
HOT_PATHS = frozenset({b"/v1/chat/completions", b"/v1/completions"})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _HandedOver(Exception):
    """Stops the parser: the connection belongs to aiohttp from this request on."""


class _Refused(Exception):
    """Stops the parser: the request gets `error` and the connection closes."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        self.error = error


class Refusal(NamedTuple):
    """An error the front answers itself, for the request being read when it arose."""

    error: GatewayError
    path: str
    """The request's path, or "-" when its request line was not read."""
    request_id: str

    # What the access log and metrics read of a request (middleware.Recorded): a refused one
    # had no tenant and reached no worker.
    @property
    def tenant(self) -> None:
        return None

    @property
    def access(self) -> None:
        return None


class Front:
    """What every connection shares: the handler of served requests, aiohttp's protocol
    factory for the rest, limits, and the open connections (for draining)."""

    def __init__(
        self,
        serve: Callable[[FrontConnection, Incoming], Awaitable[Written]],
        hand_over: Callable[[], asyncio.Protocol],
        max_body_bytes: int,
        keepalive_s: float = 75.0,
        refused: Callable[[Refusal], None] | None = None,
    ) -> None:
        self.serve = serve
        self.hand_over = hand_over
        self.refused = refused
        """Told of every refusal once it was written (metrics and the access log)."""
        self.max_body_bytes = max_body_bytes
        self.keepalive_s = keepalive_s
        self.connections: set[FrontConnection] = set()
        self.closing = False

    def __call__(self) -> FrontConnection:
        return FrontConnection(self)


class FrontConnection(asyncio.Protocol):
    def __init__(self, front: Front) -> None:
        self._front = front
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._queue: deque[Incoming] = deque()
        self._task: asyncio.Task[None] | None = None
        self._incoming: Incoming | None = None
        self._fresh = True  # no request was in progress when the current read began
        self._head: list[bytes] = []  # the current request's bytes until its head is read
        self._handover: list[bytes] | None = None
        self._refusal: Refusal | None = None  # sent once the requests before it are
        self._last_data_at = 0.0
        self._idle: asyncio.TimerHandle | None = None
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None
        self.closing = False  # no request is served after the current one
        self.answered = False  # the current request's answer went out whole
        self._gone = False

    def answer_sent(self) -> None:
        """The current request's answer went out whole (its stream's last chunk written)."""
        self.answered = True

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport  # type: ignore[assignment]
        self._front.connections.add(self)
        self._last_data_at = self._loop.time()
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        self._last_data_at = self._loop.time()
        incoming = self._incoming
        self._fresh = incoming is None
        if incoming is None:
            self._head = [data]
        elif not incoming.head_done:
            self._head.append(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            context = exc.__context__
            if isinstance(context, _HandedOver):
                return
            self._refuse(
                context.error if isinstance(context, _Refused) else InvalidRequest("bad request")
            )
        except httptools.HttpParserUpgrade:
            self._refuse(InvalidRequest("protocol upgrades are not served here"))
        except httptools.HttpParserError:
            self._refuse(InvalidRequest("malformed HTTP request"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._front.connections.discard(self)
        self.closing = self._gone = True
        if self._idle is not None:
            self._idle.cancel()
        if self._task is not None and not self.answered:
            # A client that hung up after its answer's last byte lost nothing: the request
            # ends (and is booked) as it would have; any other is cancelled, as aiohttp does.
            self._task.cancel()
        self._wake_drained(ConnectionResetError("the client went away"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drained(None)

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._incoming = Incoming(self._fresh)
        self._fresh = False  # a second request in the same read did not start it

    def on_url(self, url: bytes) -> None:
        self._incoming.url += url  # type: ignore[union-attr]
        self._check_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._incoming.add_header(name, value)  # type: ignore[union-attr]
        self._check_head(len(name) + len(value))

    def on_headers_complete(self) -> None:
        incoming = self._incoming
        assert incoming is not None
        incoming.head_done = True
        parser = self._parser
        headers = incoming.headers
        served = (
            parser.get_method() == b"POST"
            and incoming.path in HOT_PATHS
            and parser.get_http_version() == "1.1"
            and not parser.should_upgrade()
            # A compressed body is aiohttp's to inflate.
            and headers.get("content-encoding", "identity").lower() == "identity"
        )
        if not served:
            if not incoming.starts_read:
                raise _Refused(
                    InvalidRequest("a pipelined request to this path must come on its own")
                )
            self._hand_over(self._head)
            raise _HandedOver
        self._head = []
        length = incoming.content_length()
        limit = self._front.max_body_bytes
        if length is not None and length > limit:
            raise _Refused(too_large(limit, length))
        expects = headers.get("expect", "").lower() == "100-continue"
        if expects and self.transport and self._task is None and not self._queue:
            # Not while another answer is being written: it would land inside that answer
            # (the client sends its body anyway when no interim answer comes).
            self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        incoming = self._incoming
        assert incoming is not None
        incoming.body.append(body)
        incoming.body_size += len(body)
        if incoming.body_size > self._front.max_body_bytes:
            raise _Refused(too_large(self._front.max_body_bytes))

    def on_message_complete(self) -> None:
        incoming = self._incoming
        assert incoming is not None
        self._incoming = None
        incoming.keep_alive = self._parser.should_keep_alive()
        self._queue.append(incoming)
        if self._task is None:
            self._task = self._loop.create_task(self._run())
        elif len(self._queue) >= MAX_QUEUED and self.transport is not None:
            self.transport.pause_reading()

    # serving

    async def _run(self) -> None:
        try:
            while self._queue and not self.closing:
                if self._write_paused:
                    await self.drain()  # a client that reads nothing gets no more answers
                incoming = self._queue.popleft()
                waiting = self._handover is not None or self._refusal is not None
                if self.transport is not None and len(self._queue) < MAX_QUEUED and not waiting:
                    self.transport.resume_reading()
                self.answered = False
                written = await self._front.serve(self, incoming)
                if written is not Written.WHOLE or not incoming.keep_alive:
                    self.closing = True
        except ConnectionError:
            self.closing = True
        except Exception:  # a defect: the connection cannot be trusted to be in step
            log.exception("the front failed serving a request")
            self.closing = True
        finally:
            self._task = None
            self.answered = False
        if self._refusal is not None and not self._gone:
            self._send_refusal(self._refusal)
        elif self.closing or self._front.closing:
            self.close()
        elif self._handover is not None:
            self._hand_over(self._handover)
        else:
            self._last_data_at = self._loop.time()  # idle from the answer's end
            self._arm_idle()

    async def drain(self) -> None:
        """Until the client's socket took what was written (pumped streams wait here)."""
        if self._gone:
            raise ConnectionResetError("the client went away")
        if not self._write_paused:
            return
        self._drained = self._loop.create_future()
        await self._drained

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The request being served, if any."""
        return self._task

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def cancel(self) -> None:
        """Drop the connection and the request it serves (the end of a drain)."""
        if self._task is not None:
            self._task.cancel()
        self.close()

    # inner workings

    def _hand_over(self, head: list[bytes]) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._task is not None:
            # The answer in flight goes out first; the rest of the connection waits.
            self._handover = head
            transport.pause_reading()
            return
        self._handover = None
        self._front.connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()
        protocol = self._front.hand_over()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self._write_paused:
            protocol.pause_writing()
        transport.resume_reading()  # before the replay: aiohttp may pause it again
        protocol.data_received(b"".join(head))

    def _refuse(self, error: GatewayError) -> None:
        """Answer `error` after the requests read before it, then close."""
        incoming, self._incoming = self._incoming, None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        path, request_id = "-", None
        if incoming is not None:
            path = incoming.path.decode("latin-1") or "-"
            request_id = incoming.headers.get("x-request-id")
        refusal = Refusal(error, path, new_request_id(request_id))
        if self._task is None:
            self._send_refusal(refusal)
        else:
            self._refusal = refusal
            transport.pause_reading()

    def _send_refusal(self, refusal: Refusal) -> None:
        if self.transport is not None:
            self.transport.write(error_bytes(refusal.error, refusal.request_id))
        self.close()
        if self._front.refused is not None:
            self._front.refused(refusal)

    def _check_head(self, size: int) -> None:
        incoming = self._incoming
        assert incoming is not None
        incoming.head_size += size
        if incoming.head_size > MAX_HEAD_BYTES:
            error = InvalidRequest("the request's head is too large", code="header_too_large")
            error.status = 431
            raise _Refused(error)

    def _arm_idle(self) -> None:
        """One timer per connection, moved only when it fires (not once per request)."""
        if self._idle is None:
            when = self._last_data_at + self._front.keepalive_s
            self._idle = self._loop.call_at(when, self._expire)

    def _expire(self) -> None:
        self._idle = None
        if self.closing:
            return
        now, keepalive_s = self._loop.time(), self._front.keepalive_s
        if self._task is None and now - self._last_data_at >= keepalive_s:
            self.close()
        elif self._task is not None:
            # A request in flight has its own deadlines: look again a keep-alive later.
            self._idle = self._loop.call_at(now + keepalive_s, self._expire)
        else:
            self._arm_idle()

    def _wake_drained(self, exc: Exception | None) -> None:
        waiter, self._drained = self._drained, None
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)
