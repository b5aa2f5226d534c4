"""The relay: one attempt of one request on one chosen worker, up to an `Answer` to pass on.

`Relay.attempt` sends the request and waits for the worker's first byte: the whole body of a
non-streamed answer (vLLM sends its head only once the answer is complete), or the first body
chunk of a stream. Anything that goes wrong until then raises `AttemptFailed`, which the
dispatcher may retry elsewhere: nothing has reached the client yet. The answer from there on is
`stream.Answer`'s. Nothing here knows the client's HTTP response: the HTTP layer writes what the
answer yields.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time

from prometheus_client import Counter

from router.config import RetryConfig, TimeoutsConfig
from router.domain.policy import Decision
from router.domain.worker import Worker
from router.errors import GatewayError, UpstreamFailed, UpstreamTimeout
from router.upstream.answer import answer_of
from router.upstream.call import CallResult, UpstreamCall
from router.upstream.http1 import Connection, Head, format_request
from router.upstream.sse import patch_cached, usage_from
from router.upstream.stream import Answer
from router.upstream.upstream_pool import UpstreamClient

log = logging.getLogger("prefix_router.relay")

RETRYABLE_STATUSES = frozenset({502, 503, 504})
_JSON = "application/json"


class AttemptFailed(Exception):
    """The attempt failed before any byte reached the client."""

    def __init__(
        self, cause: str, error: GatewayError, retryable: bool = True, *, unseen: bool = False
    ) -> None:
        super().__init__(cause)
        self.cause = cause
        self.error = error
        self.retryable = retryable
        self.unseen = unseen
        """The worker never saw the request (no connection): trying the next one is free."""


async def _read_all(conn: Connection, deadline: float) -> bytes:
    parts = []
    while chunk := await conn.read(deadline):
        parts.append(chunk)
    return b"".join(parts)


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


class Relay:
    def __init__(
        self,
        client: UpstreamClient,
        timeouts: TimeoutsConfig,
        retries: RetryConfig,
        resends: Counter,
    ) -> None:
        self._client = client
        self._resends = resends
        self.reconfigure(timeouts, retries)

    def reconfigure(self, timeouts: TimeoutsConfig, retries: RetryConfig) -> None:
        self._timeouts = timeouts
        self._retries = retries
        self._client.keepalive_s = timeouts.keepalive_s

    async def attempt(self, call: UpstreamCall, decision: Decision, result: CallResult) -> Answer:
        """Send the call to the decision's worker and wait for its first byte."""
        worker = decision.worker
        uncached = max(0, call.routing.prompt_tokens - decision.matched_tokens)
        dispatch = worker.begin(uncached)
        try:
            result.sent_at = time.perf_counter()
            timeouts = self._timeouts
            # A non-streamed answer's head comes only once it is complete: its deadline is the
            # generation's, not the first byte's.
            wait_s = timeouts.first_byte_s if call.stream else timeouts.non_streamed_s
            deadline = _loop_time() + wait_s
            conn, head = await self._open(worker, call, deadline)
            try:
                if head.status != 200:
                    await self._upstream_error(conn, head, worker, result)
                if call.stream:
                    first = await self._first_chunk(conn, call, deadline)
                    dispatch.first_byte()
                    self._stamp(result)
                    return Answer(
                        self._client, call, decision, dispatch, result, timeouts.idle_s,
                        conn=conn, first=first,
                    )  # fmt: skip
                body = await self._whole_body(conn, worker, call, deadline)
            except BaseException:
                self._client.release(worker.url, conn)  # closed unless read to the end
                raise
            self._client.release(worker.url, conn)
            self._stamp(result)
            try:
                payload = json.loads(body)
            except ValueError:
                payload = None
            if call.cached_override is not None and patch_cached(payload, call.cached_override):
                body = json.dumps(payload).encode()
            result.usage = usage_from(payload)
            if call.collect_answer:
                result.answer = answer_of(payload)
            return Answer(
                self._client, call, decision, dispatch, result, timeouts.idle_s, body=body
            )
        except BaseException:
            dispatch.end()
            raise

    @staticmethod
    def _stamp(result: CallResult) -> None:
        if result.ttft_s is not None:
            return  # a continuation: the client had its first token long ago
        now = time.perf_counter()
        result.status = 200
        result.ttft_s = now - result.started_at
        result.upstream_ttfb_s = now - result.sent_at

    async def _open(
        self, worker: Worker, call: UpstreamCall, deadline: float
    ) -> tuple[Connection, Head]:
        """Send the request and read the answer's status line and headers."""
        conn = await self._send(worker, call)
        try:
            return conn, await conn.read_head(deadline)
        except TimeoutError:
            self._client.release(worker.url, conn)
            raise self._accepted_timeout(worker, call) from None
        except ConnectionError as exc:
            self._client.release(worker.url, conn)
            # A reused connection the worker closed as the request went out may have carried
            # it to the worker: it is not sent again here (the dispatcher may retry it
            # elsewhere), unlike one found closed before anything was written.
            reused = conn.used > 1 and not conn.received_any
            raise AttemptFailed(
                "stale_connection" if reused else "reset",
                UpstreamFailed(f"worker {worker.id} failed: {exc}"),
            ) from None
        except BaseException:
            self._client.release(worker.url, conn)  # cancelled: the worker must see it
            raise

    def _accepted_timeout(self, worker: Worker, call: UpstreamCall) -> AttemptFailed:
        """The worker took the request and may still be generating: another worker gets it
        only when the config asks, so one slow answer does not cost several GPUs."""
        cause = "first_byte_timeout" if call.stream else "generation_timeout"
        return AttemptFailed(
            cause,
            UpstreamTimeout(f"worker {worker.id} did not answer in time"),
            retryable=self._retries.retry_on_first_byte_timeout or call.retry_silence,
        )

    async def _send(self, worker: Worker, call: UpstreamCall) -> Connection:
        """Connect (or reuse a kept-alive connection) and send the request in one write."""
        headers = {"Content-Type": _JSON, "X-Request-Id": call.request_id}
        endpoint = worker.endpoint
        # Built before connecting: a request that cannot be written must not hold a connection.
        request = format_request(
            endpoint.target(call.path), endpoint.host_header, call.body, headers
        )
        for fresh in (False, True):
            conn = await self._connect(worker, fresh)
            if conn.send(request):
                return conn
            # Closed by the worker while idle, found before a byte was written: the worker
            # cannot have seen it, so a new connection costs it nothing.
            self._client.release(worker.url, conn)
            self._resends.inc()
        raise AttemptFailed(
            "connect", UpstreamFailed(f"worker {worker.id} closed every connection"), unseen=True
        )

    async def _connect(self, worker: Worker, fresh: bool) -> Connection:
        try:
            return await self._client.connect(
                worker.url,
                self._timeouts.connect_s,
                fresh,
                endpoint=worker.endpoint,
                context=worker.ssl,
            )
        except TimeoutError:
            raise AttemptFailed(
                "connect_timeout", UpstreamFailed(f"worker {worker.id} did not accept in time")
            ) from None
        except ssl.SSLError as exc:
            # Never a silent downgrade: a worker whose certificate is not trusted gets nothing.
            raise AttemptFailed(
                "tls",
                UpstreamFailed(f"worker {worker.id}: TLS handshake failed ({exc.reason})"),
                unseen=True,
            ) from None
        except OSError as exc:
            raise AttemptFailed(
                "connect", UpstreamFailed(f"worker {worker.id} unreachable: {exc}"), unseen=True
            ) from None

    async def _first_chunk(self, conn: Connection, call: UpstreamCall, deadline: float) -> bytes:
        try:
            first = await conn.read(deadline)
        except TimeoutError:
            raise AttemptFailed(
                "first_byte_timeout",
                UpstreamTimeout("worker sent no first token in time"),
                retryable=self._retries.retry_on_first_byte_timeout or call.retry_silence,
            ) from None
        except ConnectionError as exc:
            raise AttemptFailed(
                "reset", UpstreamFailed(f"worker broke the stream: {exc}")
            ) from None
        if not first:
            raise AttemptFailed("reset", UpstreamFailed("worker closed the stream without data"))
        return first

    async def _whole_body(
        self, conn: Connection, worker: Worker, call: UpstreamCall, deadline: float
    ) -> bytes:
        try:
            return await _read_all(conn, deadline)
        except TimeoutError:
            raise self._accepted_timeout(worker, call) from None
        except ConnectionError as exc:
            raise AttemptFailed(
                "read", UpstreamFailed(f"worker broke the response: {exc}")
            ) from None

    async def _upstream_error(
        self, conn: Connection, head: Head, worker: Worker, result: CallResult
    ) -> None:
        """Raise what a non-200 answer means: retryable (5xx, 429 when configured), else the
        client's own error passed on, reshaped."""
        status = head.status
        try:
            raw = await _read_all(conn, _loop_time() + self._timeouts.idle_s)
            message = str(json.loads(raw)["error"]["message"])
        except (ValueError, KeyError, TypeError, ConnectionError, TimeoutError):
            message = f"worker answered HTTP {status}"
        if status >= 500 or (status == 429 and self._retries.retry_on_429):
            cause = f"http_{status}" if status in RETRYABLE_STATUSES else f"http_{status // 100}xx"
            raise AttemptFailed(cause, UpstreamFailed(f"worker {worker.id} failed: {message}"))
        # A 4xx is the client's problem (context too long, bad field): pass it on, reshaped.
        error = GatewayError(message, code=None)
        error.status = status
        error.error_type = "invalid_request_error"
        if status == 429:
            error.error_type = "rate_limit_error"
            error.retry_after_s = 1.0
        result.status = status
        raise error
