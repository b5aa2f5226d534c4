"""A request the front serves, and how its answer is written: the response head built here
(status line, the reply's headers, framing) and sent with the body or the stream's first block
in one write."""

from __future__ import annotations

import asyncio
import email.utils
import enum
import time
from collections.abc import Iterator, Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, TypeVar, overload

from router.errors import GatewayError
from router.http.exchange import EVENT_STREAM, JSON, LAST_CHUNK, ClientStream, Exchange, Reply
from router.loop_metrics import LoopHistogramChild

if TYPE_CHECKING:
    from router.http.front.protocol import FrontConnection

_T = TypeVar("_T")


class Headers(Mapping[str, str]):
    """A request's headers by lower-cased name (the first of repeated ones, as aiohttp's `get`
    answers); lookups are case-insensitive."""

    __slots__ = ("_by_name",)

    def __init__(self, by_name: dict[str, str]) -> None:
        self._by_name = by_name

    def __getitem__(self, name: str) -> str:
        return self._by_name[name.lower()]

    @overload
    def get(self, name: str, /) -> str | None: ...
    @overload
    def get(self, name: str, /, default: str | _T) -> str | _T: ...
    def get(self, name: str, /, default: object = None) -> object:
        return self._by_name.get(name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._by_name

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)


class Incoming:
    """A request as the parser reads it."""

    __slots__ = (
        "_headers",
        "body",
        "body_size",
        "head_done",
        "head_size",
        "headers",
        "keep_alive",
        "starts_read",
        "url",
    )

    def __init__(self, starts_read: bool) -> None:
        self.starts_read = starts_read  # its first byte began a read: it can be handed over
        self.url = b""
        self._headers: dict[str, str] = {}
        self.headers = Headers(self._headers)  # a view: headers added later show in it
        self.head_done = False
        self.head_size = 0
        self.body: list[bytes] = []
        self.body_size = 0
        self.keep_alive = True

    def add_header(self, name: bytes, value: bytes) -> None:
        self._headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))

    @property
    def path(self) -> bytes:
        return self.url.partition(b"?")[0]

    def content_length(self) -> int | None:
        value = self._headers.get("content-length")
        return int(value) if value is not None and value.isdigit() else None

    def body_bytes(self) -> bytes:
        return self.body[0] if len(self.body) == 1 else b"".join(self.body)


class Written(enum.Enum):
    WHOLE = "whole"  # the answer went out whole: the connection may serve another request
    CUT = "cut"  # it could not be finished as HTTP: the connection must close
    GONE = "gone"  # the client went away before it


_REASONS = {status.value: status.phrase for status in HTTPStatus}


def _date() -> str:
    return email.utils.formatdate(usegmt=True)


class _DateCache:
    """The Date header's value, formatted once a second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = 0
        self._value = ""

    def now(self) -> str:
        second = int(time.time())
        if second != self._second:
            self._second, self._value = second, _date()
        return self._value


_DATE = _DateCache()


def response_head(
    status: int, headers: Mapping[str, str], content_type: str, framing: str, close: bool
) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
        f"Content-Type: {content_type}",
        framing,
        f"Date: {_DATE.now()}",
    ]
    for name, value in headers.items():
        if "\r" in value or "\n" in value:
            value = " ".join(value.splitlines())  # never a header line of its own
        lines.append(f"{name}: {value}")
    if close:
        lines.append("Connection: close")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1", "replace")


def error_bytes(error: GatewayError, request_id: str) -> bytes:
    """A whole error response for a request the front refuses before any handler ran."""
    body = error.body_bytes()
    headers = error.headers()
    headers["X-Request-Id"] = request_id
    head = response_head(error.status, headers, JSON, f"Content-Length: {len(body)}", close=True)
    return head + body


class FrontExchange(Exchange):
    __slots__ = ("_body", "_conn", "_keep_alive", "_stream", "head_sent")

    def __init__(self, conn: FrontConnection, incoming: Incoming, request_id: str) -> None:
        super().__init__(incoming.path.decode("latin-1"), incoming.headers, request_id)
        self._conn = conn
        self._body = incoming.body_bytes()
        self._keep_alive = incoming.keep_alive
        self.head_sent = False
        self._stream: ClientStream | None = None

    async def read_body(self, max_bytes: int) -> bytes:
        return self._body  # read whole by the connection, within the same limit

    def _transport_or_gone(self) -> asyncio.Transport:
        transport = self._conn.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client went away")
        return transport

    async def open_stream(
        self, headers: dict[str, str], first: bytes, gaps: LoopHistogramChild
    ) -> ClientStream:
        transport = self._transport_or_gone()
        headers["Cache-Control"] = "no-cache"
        close = not self._keep_alive or self._conn.closing
        head = response_head(200, headers, EVENT_STREAM, "Transfer-Encoding: chunked", close)
        stream = ClientStream(
            transport,
            True,
            self._conn.drain,
            gaps,
            ends_at_done=True,
            # The connection's method, not ours: we hold the stream, and a cycle through it is
            # freed only by the collector.
            on_last=self._conn.answer_sent,
        )
        transport.write(head + stream.frame(first))
        self.head_sent = True
        self._stream = stream
        return stream

    async def end_stream(self) -> None:
        if self._stream is None or not self._stream.ended:
            self._transport_or_gone().write(LAST_CHUNK)

    def send(self, reply: Reply) -> Written:
        """Write a whole reply; a reply after a stream's head cannot be sent (CUT)."""
        body = reply.body
        transport = self._conn.transport
        if body is None:
            return Written.WHOLE  # a stream, written whole (a cut one raised instead)
        if transport is None or transport.is_closing():
            return Written.GONE
        if self.head_sent:
            return Written.CUT
        close = not self._keep_alive or self._conn.closing
        framing = f"Content-Length: {len(body)}"
        head = response_head(reply.status, reply.headers, reply.content_type, framing, close)
        transport.write(head + body)
        self._conn.answer_sent()
        return Written.WHOLE
