"""The relay: send one request to a worker chosen by the pool's policy and stream the answer.

Retries happen only before the first byte reaches the client, only on retryable failures, and
never to a worker this request already tried. The client response is prepared only once the
upstream's first body chunk has arrived, so everything up to that point can still be retried.
After that, a broken upstream ends the client's stream with one OpenAI error event and no
`[DONE]`, and counts as that worker's failure. Every dispatch goes through `Worker.track`, so
in-flight counts return to zero on every ending, cancellation included.

This module is over the house rule's ~400 lines because dispatch (pick, retries, budget,
outlier bookkeeping) and the relay of one attempt still live together; splitting them is
issue 12 point 10, which stream migration and P/D routing build on. It is done there as one
change, not piecemeal here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable

from aiohttp import web

from router.config import RetryConfig, TimeoutsConfig
from router.domain.policy import Decision, Outcome, RoutingRequest
from router.domain.worker import Worker
from router.errors import GatewayError, NoCapacity, UpstreamFailed, UpstreamTimeout
from router.metrics import GatewayMetrics
from router.routing.key import extend_key
from router.upstream.answer import AnswerBytes, answer_of
from router.upstream.call import CallResult, UpstreamCall
from router.upstream.http1 import Connection, Head, UpstreamClient, format_request
from router.upstream.outlier import OutlierDetector
from router.upstream.sse import DONE, EVENT_END, error_event, split_usage_event, usage_from

log = logging.getLogger("prefix_router.proxy")

RETRYABLE_STATUSES = frozenset({502, 503, 504})
_JSON = "application/json"


class _Retryable(Exception):
    def __init__(self, cause: str, error: GatewayError, retryable: bool = True) -> None:
        super().__init__(cause)
        self.cause = cause
        self.error = error
        self.retryable = retryable
        self.worker: Worker | None = None


async def _read_all(conn: Connection, deadline: float) -> bytes:
    parts = []
    while chunk := await conn.read(deadline):
        parts.append(chunk)
    return b"".join(parts)


class Proxy:
    def __init__(
        self,
        client: UpstreamClient,
        timeouts: TimeoutsConfig,
        retries: RetryConfig,
        outlier: OutlierDetector,
        metrics: GatewayMetrics,
        rng: random.Random | None = None,
    ) -> None:
        self._client = client
        self._timeouts = timeouts
        self._retries = retries
        self._outlier = outlier
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._active = 0
        self._retrying = 0

    def reconfigure(self, timeouts: TimeoutsConfig, retries: RetryConfig) -> None:
        self._timeouts = timeouts
        self._retries = retries

    def _retry_allowed(self) -> bool:
        budget = max(self._retries.min_retries_in_flight, self._retries.budget_share * self._active)
        return self._retrying < budget

    async def forward(
        self, request: web.Request, call: UpstreamCall, result: CallResult
    ) -> web.StreamResponse:
        started = time.perf_counter()
        tried: set[Worker] = set()
        last_error: GatewayError | None = None
        # Attempts that failed before the worker saw the request (connection refused) are
        # free: the next candidate costs no GPU work, so they do not use up max_attempts.
        counted = 0
        last_cause = ""
        self._active += 1
        try:
            async with asyncio.timeout(self._timeouts.total_s) as total:
                while counted < self._retries.max_attempts:
                    candidates = [w for w in call.pool.candidates() if w not in tried]
                    if not candidates:
                        break
                    retrying = result.attempts > 0 and last_cause != "connect"
                    if retrying:
                        if not self._retry_allowed():
                            self._metrics.retries.labels("budget_exhausted").inc()
                            break
                        await asyncio.sleep(self._backoff_s(result.attempts))
                        self._retrying += 1
                    try:
                        return await self._try_once(
                            request, call, result, candidates, started, total
                        )
                    except _Retryable as exc:
                        if not exc.retryable:
                            raise exc.error from None
                        last_error = exc.error
                        if exc.worker is not None:
                            tried.add(exc.worker)
                        last_cause = exc.cause
                        if exc.cause != "connect":
                            counted += 1
                        if counted < self._retries.max_attempts:
                            self._metrics.retries.labels(exc.cause).inc()
                    finally:
                        if retrying:
                            self._retrying -= 1
        finally:
            self._active -= 1
        if last_error is not None:
            raise last_error
        raise NoCapacity(
            f"no healthy worker can serve model `{call.pool.name}` now", retry_after_s=1.0
        )

    def _backoff_s(self, attempt: int) -> float:
        ceiling = min(
            self._retries.backoff_max_s, self._retries.backoff_base_s * 2 ** (attempt - 1)
        )
        return self._rng.uniform(0, ceiling)

    async def _try_once(
        self,
        request: web.Request,
        call: UpstreamCall,
        result: CallResult,
        candidates: list[Worker],
        started: float,
        total: asyncio.Timeout,
    ) -> web.StreamResponse:
        policy = call.pool.policy
        t0 = time.perf_counter()
        decision = policy.pick(call.routing, candidates)
        self._record_decision(policy.name, decision, call.routing, t0)
        if call.on_decision is not None:
            call.on_decision(decision)
        worker = decision.worker
        result.attempts += 1
        result.worker, result.decision = worker, decision
        try:
            return await self._attempt(request, call, decision, result, started, total)
        except _Retryable as exc:
            exc.worker = worker
            self._metrics.upstream_failures.labels(exc.cause).inc()
            self._outlier.failure(worker, exc.cause)
            policy.observe(Outcome(call.routing, decision, ok=False))
            log.info("attempt on %s failed (%s), request %s", worker.id, exc.cause, call.request_id)
            raise

    def _record_decision(
        self, policy: str, decision: Decision, routing: RoutingRequest, t0: float
    ) -> None:
        m = self._metrics
        m.decision_time.labels(policy).observe(time.perf_counter() - t0)
        m.decisions.labels(policy, decision.reason).inc()
        if routing.prompt_tokens:
            m.matched_ratio.labels(policy).observe(
                min(1.0, decision.matched_tokens / routing.prompt_tokens)
            )

    async def _attempt(
        self,
        request: web.Request,
        call: UpstreamCall,
        decision: Decision,
        result: CallResult,
        started: float,
        total: asyncio.Timeout,
    ) -> web.StreamResponse:
        worker = decision.worker
        uncached = max(0, call.routing.prompt_tokens - decision.matched_tokens)
        with worker.track(uncached) as dispatch:
            result.sent_at = time.perf_counter()
            # A non-streamed answer's head comes only once it is complete: its deadline is the
            # generation's, not the first byte's.
            timeouts = self._timeouts
            wait_s = timeouts.first_byte_s if call.stream else timeouts.non_streamed_s
            first_byte_deadline = self._loop_time() + wait_s
            conn, head = await self._open(worker, call, first_byte_deadline)
            try:
                if head.status != 200:
                    return await self._upstream_error(conn, head, worker, result)
                if call.stream:
                    return await self._relay_stream(
                        request,
                        call,
                        conn,
                        decision,
                        dispatch.first_byte,
                        result,
                        started,
                        first_byte_deadline,
                        total,
                    )
                return await self._relay_body(
                    call, conn, decision, result, started, first_byte_deadline
                )
            finally:
                self._client.release(worker.url, conn)

    @staticmethod
    def _loop_time() -> float:
        return asyncio.get_running_loop().time()

    async def _open(
        self, worker: Worker, call: UpstreamCall, deadline: float
    ) -> tuple[Connection, Head]:
        """Send the request and read the answer's status line and headers.

        A kept-alive connection the worker closed while it sat idle fails before any byte of
        an answer; the worker never saw the request, so it goes out once more on a new
        connection instead of counting as the worker's failure."""
        for fresh in (False, True):
            conn = await self._send(worker, call, fresh)
            try:
                return conn, await conn.read_head(deadline)
            except TimeoutError:
                self._client.release(worker.url, conn)
                raise self._accepted_timeout(worker, call) from None
            except ConnectionError as exc:
                self._client.release(worker.url, conn)
                if fresh or not conn.went_stale:
                    raise _Retryable(
                        "reset", UpstreamFailed(f"worker {worker.id} failed: {exc}")
                    ) from None
            except BaseException:
                self._client.release(worker.url, conn)  # cancelled: the worker must see it
                raise
        raise AssertionError("unreachable: the fresh attempt returns or raises")

    def _accepted_timeout(self, worker: Worker, call: UpstreamCall) -> _Retryable:
        """The worker took the request and may still be generating: another worker gets it
        only when the config asks, so one slow answer does not cost several GPUs."""
        cause = "first_byte_timeout" if call.stream else "generation_timeout"
        return _Retryable(
            cause,
            UpstreamTimeout(f"worker {worker.id} did not answer in time"),
            retryable=self._retries.retry_on_first_byte_timeout,
        )

    async def _send(self, worker: Worker, call: UpstreamCall, fresh: bool = False) -> Connection:
        """Connect (or reuse a kept-alive connection) and send the request in one write."""
        headers = {"Content-Type": _JSON, "X-Request-Id": call.request_id}
        # Built before connecting: a request that cannot be written must not hold a connection.
        request = format_request(call.path, worker.url.split("://", 1)[1], call.body, headers)
        try:
            conn = await self._client.connect(worker.url, self._timeouts.connect_s, fresh)
        except TimeoutError:
            raise _Retryable(
                "connect_timeout", UpstreamFailed(f"worker {worker.id} did not accept in time")
            ) from None
        except OSError as exc:
            raise _Retryable(
                "connect", UpstreamFailed(f"worker {worker.id} unreachable: {exc}")
            ) from None
        conn.send(request)
        return conn

    async def _upstream_error(
        self, conn: Connection, head: Head, worker: Worker, result: CallResult
    ) -> web.StreamResponse:
        status = head.status
        try:
            raw = await _read_all(conn, self._loop_time() + self._timeouts.idle_s)
            message = str(json.loads(raw)["error"]["message"])
        except (ValueError, KeyError, TypeError, ConnectionError, TimeoutError):
            message = f"worker answered HTTP {status}"
        if status >= 500 or (status == 429 and self._retries.retry_on_429):
            cause = f"http_{status}" if status in RETRYABLE_STATUSES else f"http_{status // 100}xx"
            raise _Retryable(cause, UpstreamFailed(f"worker {worker.id} failed: {message}"))
        # A 4xx is the client's problem (context too long, bad field): pass it on, reshaped.
        error = GatewayError(message, code=None)
        error.status = status
        error.error_type = "invalid_request_error"
        if status == 429:
            error.error_type = "rate_limit_error"
            error.retry_after_s = 1.0
        result.status = status
        raise error

    async def _relay_body(
        self,
        call: UpstreamCall,
        conn: Connection,
        decision: Decision,
        result: CallResult,
        started: float,
        deadline: float,
    ) -> web.StreamResponse:
        try:
            body = await _read_all(conn, deadline)
        except TimeoutError:
            raise self._accepted_timeout(decision.worker, call) from None
        except ConnectionError as exc:
            raise _Retryable("read", UpstreamFailed(f"worker broke the response: {exc}")) from None
        now = time.perf_counter()
        result.ttft_s = now - started
        result.upstream_ttfb_s = now - result.sent_at
        result.status = 200
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        result.usage = usage_from(payload)
        if call.collect_answer:
            result.answer = answer_of(payload)
        self._finish(call, decision, result, ok=True)
        response = web.Response(body=body, status=200, content_type=_JSON)
        self._decorate(response, call, decision)
        return response

    async def _relay_stream(
        self,
        request: web.Request,
        call: UpstreamCall,
        conn: Connection,
        decision: Decision,
        on_first_byte: Callable[[], None],
        result: CallResult,
        started: float,
        first_byte_deadline: float,
        total: asyncio.Timeout,
    ) -> web.StreamResponse:
        try:
            first = await conn.read(first_byte_deadline)
        except TimeoutError:
            raise _Retryable(
                "first_byte_timeout",
                UpstreamTimeout("worker sent no first token in time"),
                retryable=self._retries.retry_on_first_byte_timeout,
            ) from None
        except ConnectionError as exc:
            raise _Retryable("reset", UpstreamFailed(f"worker broke the stream: {exc}")) from None
        if not first:
            raise _Retryable("reset", UpstreamFailed("worker closed the stream without data"))
        on_first_byte()
        now = time.perf_counter()
        result.ttft_s = now - started
        result.upstream_ttfb_s = now - result.sent_at
        response = web.StreamResponse(status=200)
        response.content_type = "text/event-stream"
        response.headers["Cache-Control"] = "no-cache"
        self._decorate(response, call, decision)
        await response.prepare(request)
        result.status = 200
        # Past the status line no HTTP error can reach the client, so the total deadline moves
        # from the caller's scope to this stream, which ends it with an error event.
        stream_deadline = asyncio.timeout_at(total.when())
        total.reschedule(None)

        idle_s = self._timeouts.idle_s
        pending = b""
        answer = AnswerBytes() if call.collect_answer else None
        saw_done = False
        drop_usage = not call.client_wants_usage
        transform = call.transform
        gaps = self._metrics.inter_token.labels(call.pool.name)
        last_write = 0.0
        chunk = first
        try:
            async with stream_deadline:
                while chunk:
                    data = pending + chunk if pending else chunk
                    if data.endswith(EVENT_END):
                        pending = b""
                    else:
                        cut = data.rfind(EVENT_END)
                        if cut < 0:
                            pending = data
                            chunk = await conn.read(self._loop_time() + idle_s)
                            continue
                        data, pending = data[: cut + 2], data[cut + 2 :]
                    if b'"usage"' in data:
                        data, usage, done = split_usage_event(data, drop_usage)
                        result.usage = usage or result.usage
                        saw_done = saw_done or done
                    elif data.endswith(DONE):
                        saw_done = True
                    if transform is not None:
                        data = transform(data)
                    if answer is not None:
                        answer.add(data)
                    if data:
                        await response.write(data)
                        now = time.perf_counter()
                        if last_write:
                            gaps.observe(now - last_write)
                        else:
                            result.first_write_at = now
                        last_write = now
                    chunk = await conn.read(self._loop_time() + idle_s)
        except (ConnectionError, TimeoutError) as exc:
            if request.transport is None or request.transport.is_closing():
                raise  # the client left; nothing to tell it
            if stream_deadline.expired():
                await self._end_overdue_stream(response, call, decision, result)
                return response
            cause = "idle_timeout" if isinstance(exc, TimeoutError) else "stream_broken"
            await self._end_broken_stream(response, call, decision, result, cause)
            return response
        if not saw_done:
            await self._end_broken_stream(response, call, decision, result, "no_done")
            return response
        if answer is not None:
            result.answer = answer.text()
        self._finish(call, decision, result, ok=True)
        # A client that read [DONE] may hang up before the last chunk: nothing was lost.
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        return response

    async def _end_broken_stream(
        self,
        response: web.StreamResponse,
        call: UpstreamCall,
        decision: Decision,
        result: CallResult,
        cause: str,
    ) -> None:
        worker = decision.worker
        result.stream_broken = True
        self._outlier.failure(worker, cause)
        self._metrics.upstream_failures.labels(cause).inc()
        self._metrics.stream_errors.labels(call.pool.name).inc()
        log.warning("stream from %s broke (%s), request %s", worker.id, cause, call.request_id)
        self._finish(call, decision, result, ok=False)
        try:
            await response.write(
                error_event(
                    f"the worker serving this request failed mid-stream ({cause})",
                    "upstream_error",
                    "upstream_stream_broken",
                )
            )
            await response.write_eof()
        except ConnectionError:
            pass

    async def _end_overdue_stream(
        self,
        response: web.StreamResponse,
        call: UpstreamCall,
        decision: Decision,
        result: CallResult,
    ) -> None:
        """The answer outlived the total deadline. A long answer is no broken worker, so no
        outlier failure; but the client must not take the cut answer for a finished one."""
        result.stream_broken = True
        self._metrics.stream_errors.labels(call.pool.name).inc()
        log.warning(
            "stream from %s ran past total_s, request %s", decision.worker.id, call.request_id
        )
        self._finish(call, decision, result, ok=False)
        with contextlib.suppress(ConnectionError):
            await response.write(
                error_event("the request ran past its total deadline", "upstream_error", "timeout")
            )
            await response.write_eof()

    def _finish(
        self, call: UpstreamCall, decision: Decision, result: CallResult, *, ok: bool
    ) -> None:
        if ok:
            self._outlier.success(decision.worker)
        usage = result.usage
        routing = call.routing
        if usage is not None:
            call.pool.calibration.observe(routing.key, usage.prompt_tokens)
        answer = result.answer
        call.pool.policy.observe(
            Outcome(
                routing,
                decision,
                ok=ok,
                prompt_tokens=usage.prompt_tokens if usage else None,
                cached_tokens=usage.cached_tokens if usage and usage.cached_reported else None,
                # A non-streamed answer's first byte comes when it is complete: no TTFT.
                ttft_s=result.ttft_s if call.stream else None,
                answer_key=None
                if answer is None or not ok
                else extend_key(routing.key, answer, call.path.endswith("chat/completions")),
            )
        )

    @staticmethod
    def _decorate(response: web.StreamResponse, call: UpstreamCall, decision: Decision) -> None:
        response.headers["X-Request-Id"] = call.request_id
        if call.extra_headers:
            response.headers.update(call.extra_headers)
        if call.debug_headers:
            response.headers["X-Route-Worker"] = decision.worker.id
            response.headers["X-Route-Reason"] = decision.reason
            response.headers["X-Route-Matched-Tokens"] = str(decision.matched_tokens)
