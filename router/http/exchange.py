"""One client request as the request path sees it, whichever HTTP server carried it.

The model endpoints run on the gateway's own HTTP/1.1 front (`router.http.front`) and, for a
connection that front handed to aiohttp, on aiohttp: both give the pipeline an `Exchange` (the
request's headers, body and bookkeeping; how to start and end a streamed answer) and get back a
`Reply`: a whole body to send, or a stream already written. A stream's blocks go out through
one `ClientStream`, written straight to the client's transport by the pumped relay.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from router.auth import Tenant
from router.loop_metrics import LoopHistogramChild
from router.upstream.call import CallResult
from router.upstream.sse import DONE

JSON = "application/json"
EVENT_STREAM = "text/event-stream"


@dataclass(slots=True)
class Reply:
    """What a handler answers: `body` to send, or None when a stream was written already."""

    status: int
    body: bytes | None
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = JSON


LAST_CHUNK = b"0\r\n\r\n"


class ClientStream:
    """A streamed answer's way to the client after its head: each block written to the
    transport at once (as an HTTP/1.1 chunk, or raw for an HTTP/1.0 client whose body ends with
    the connection), with the gap since the previous write timed. Also the pump's sink.

    With `ends_at_done`, the block carrying `[DONE]` (nothing follows it) goes out with the
    body's last chunk in the same write, one write per stream fewer; `ended` tells."""

    __slots__ = (
        "_chunked",
        "_drain",
        "_ends_at_done",
        "_gaps",
        "_high",
        "_last",
        "_on_last",
        "_transport",
        "ended",
    )

    def __init__(
        self,
        transport: asyncio.Transport,
        chunked: bool,
        drain: Callable[[], Awaitable[None]],
        gaps: LoopHistogramChild,
        ends_at_done: bool = False,
        on_last: Callable[[], None] | None = None,
    ) -> None:
        self._transport = transport
        self._chunked = chunked
        self._drain = drain
        self._gaps = gaps
        self._ends_at_done = ends_at_done and chunked
        self._high = transport.get_write_buffer_limits()[1]
        self._last = time.perf_counter()
        self._on_last = on_last
        self.ended = False

    def frame(self, block: bytes) -> bytes:
        if not self._chunked or not block:
            return block
        if self._ends_at_done and block.endswith(DONE):
            self.ended = True
            if self._on_last is not None:
                self._on_last()
            return b"%x\r\n%b\r\n%b" % (len(block), block, LAST_CHUNK)
        return b"%x\r\n%b\r\n" % (len(block), block)

    def first_written(self, result: CallResult) -> None:
        self._last = result.first_write_at = time.perf_counter()

    def write(self, block: bytes) -> None:
        if self.ended:
            return  # nothing may follow the body's last chunk
        transport = self._transport
        if transport.is_closing():
            raise ConnectionResetError("the client went away")
        transport.write(self.frame(block))
        now = time.perf_counter()
        self._gaps.observe(now - self._last)
        self._last = now

    def full(self) -> bool:
        return self._transport.get_write_buffer_size() > self._high

    async def drain(self) -> None:
        await self._drain()


class Exchange(ABC):
    """The client's side of one model request."""

    __slots__ = ("access", "headers", "path", "request_id", "tenant")

    def __init__(self, path: str, headers: Mapping[str, str], request_id: str) -> None:
        self.path = path
        self.headers = headers
        self.request_id = request_id
        self.tenant: Tenant | None = None
        self.access: CallResult | None = None

    @abstractmethod
    async def read_body(self, max_bytes: int) -> bytes:
        """The whole body; PayloadTooLarge past `max_bytes`."""

    @abstractmethod
    async def open_stream(
        self, headers: dict[str, str], first: bytes, gaps: LoopHistogramChild
    ) -> ClientStream:
        """Send a 200 event stream's head with its first block (one write); ConnectionResetError
        when the client is gone."""

    @abstractmethod
    async def end_stream(self) -> None:
        """Send the stream's end (the last chunk) after its last block."""
