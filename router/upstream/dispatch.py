"""Dispatch: pick a worker with the pool's policy, attempt, retry elsewhere, and book the outcome.

Retries happen only before the first byte reaches the client, only on retryable failures, never
to a worker this request already tried, and within a retry budget (a share of the requests in
flight) so a failing fleet is not hit by a retry storm. Attempts that failed before the worker
saw the request (connection refused) are free: they do not use up `max_attempts`. Every ending
is booked once: the outlier detector hears of failures and successes, the policy observes the
outcome (usage, TTFT, the answer for the index), the pool's token calibration learns.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from router.config import RetryConfig, TimeoutsConfig
from router.domain.policy import Decision, Outcome, Policy, RoutingRequest
from router.domain.worker import Role, Worker
from router.errors import GatewayError, NoCapacity
from router.metrics import GatewayMetrics
from router.routing.key import extend_key
from router.upstream.call import CallResult, UpstreamCall
from router.upstream.disaggregation import Disaggregation, ParamsSpent
from router.upstream.outlier import OutlierDetector
from router.upstream.relay import AttemptFailed, Relay
from router.upstream.stream import Answer

log = logging.getLogger("prefix_router.dispatch")


class Dispatcher:
    def __init__(
        self,
        relay: Relay,
        retries: RetryConfig,
        outlier: OutlierDetector,
        metrics: GatewayMetrics,
        rng: random.Random | None = None,
    ) -> None:
        self._relay = relay
        self._retries = retries
        self._outlier = outlier
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._active = 0
        self._retrying = 0
        self._pd = Disaggregation(self.dispatch, metrics)

    def reconfigure(self, timeouts: TimeoutsConfig, retries: RetryConfig) -> None:
        self._relay.reconfigure(timeouts, retries)
        self._retries = retries

    def _retry_allowed(self) -> bool:
        budget = max(self._retries.min_retries_in_flight, self._retries.budget_share * self._active)
        return self._retrying < budget

    def _ended(self) -> None:
        self._active -= 1

    async def dispatch(
        self,
        call: UpstreamCall,
        result: CallResult,
        deadline: float,
        exclude: set[Worker] | None = None,
    ) -> Answer:
        """An answer that has its first byte, from the first worker that gave one before
        `deadline` (loop time). A non-streamed answer is booked here; a stream is booked by
        `stream_ended` / `stream_broke` / `stream_overdue` once it ends. A P/D pool's request
        runs its prefill and decode steps (`disaggregation`), each dispatched here."""
        if call.stage is None and call.pool.disaggregated:
            return await self._pd.run(call, result, deadline, exclude)
        if not result.started_at:
            result.started_at = time.perf_counter()
        tried: set[Worker] = set(exclude or ())
        last_error: GatewayError | None = None
        counted = 0
        last_unseen = False
        self._active += 1
        try:
            async with asyncio.timeout_at(deadline):
                while counted < self._retries.max_attempts:
                    candidates = [
                        w
                        for w in call.pool.candidates(call.routing.adapter, _role(call))
                        if w not in tried
                    ]
                    if not candidates:
                        break
                    retrying = result.attempts > 0 and not last_unseen
                    if retrying:
                        if not self._retry_allowed():
                            self._metrics.retries.labels("budget_exhausted").inc()
                            break
                        await asyncio.sleep(self._backoff_s(result.attempts))
                        self._retrying += 1
                    decision = self._pick(call, result, candidates)
                    try:
                        answer = await self._relay.attempt(call, decision, result)
                    except AttemptFailed as exc:
                        self._attempt_failed(call, decision, exc)
                        if not exc.retryable:
                            raise exc.error from None
                        if call.params_single_use and not exc.unseen:
                            raise ParamsSpent(decision.worker.id) from None
                        last_error = exc.error
                        tried.add(decision.worker)
                        last_unseen = exc.unseen
                        if not exc.unseen:
                            counted += 1
                        if counted < self._retries.max_attempts:
                            self._metrics.retries.labels(exc.cause).inc()
                        continue
                    except GatewayError:
                        # The worker refused the request (its 4xx goes to the client).
                        _unanswered(call, decision)
                        raise
                    finally:
                        if retrying:
                            self._retrying -= 1
                    answer.on_close(self._ended)
                    result.segments.append(decision.worker.id)
                    if not call.stream:
                        self._book(call, answer, ok=True)
                    return answer
        except BaseException:
            self._active -= 1
            raise
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

    def _pick(self, call: UpstreamCall, result: CallResult, candidates: list[Worker]) -> Decision:
        policy = _policy(call)
        t0 = time.perf_counter()
        decision = policy.pick(call.routing, candidates)
        self._record_decision(policy.name, decision, call.routing, t0)
        if call.on_decision is not None:
            call.on_decision(decision)
        result.attempts += 1
        result.worker, result.decision = decision.worker, decision
        return decision

    def _record_decision(
        self, policy: str, decision: Decision, routing: RoutingRequest, t0: float
    ) -> None:
        m = self._metrics.policy(policy)
        m.decision_time.observe(time.perf_counter() - t0)
        m.decisions(decision.reason).inc()
        if routing.prompt_tokens:
            m.matched_ratio.observe(min(1.0, decision.matched_tokens / routing.prompt_tokens))

    def _attempt_failed(self, call: UpstreamCall, decision: Decision, exc: AttemptFailed) -> None:
        worker = decision.worker
        self._metrics.upstream_failures.labels(exc.cause).inc()
        self._outlier.failure(worker, exc.cause)
        _unanswered(call, decision)
        log.info("attempt on %s failed (%s), request %s", worker.id, exc.cause, call.request_id)

    # -- the end of a stream ----------------------------------------------------------------------

    def stream_ended(self, answer: Answer) -> None:
        self._book(answer.call, answer, ok=True)

    def stream_broke(self, answer: Answer, cause: str) -> None:
        """The worker's stream broke mid-answer: the worker's failure."""
        call, worker = answer.call, answer.worker
        self._outlier.failure(worker, cause)
        self._metrics.upstream_failures.labels(cause).inc()
        log.warning("stream from %s broke (%s), request %s", worker.id, cause, call.request_id)
        self._book(call, answer, ok=False)

    def stream_overdue(self, answer: Answer) -> None:
        """The answer outlived the total deadline. A long answer is no broken worker, so no
        outlier failure; but the answer is not a finished one."""
        call = answer.call
        answer.result.stream_broken = True
        log.warning(
            "stream from %s ran past total_s, request %s", answer.worker.id, call.request_id
        )
        self._book(call, answer, ok=False)

    def _book(self, call: UpstreamCall, answer: Answer, *, ok: bool) -> None:
        result = answer.result
        decision = answer.decision
        if ok:
            self._outlier.success(decision.worker)
        # A continuation's usage counts the whole answer, not its own prompt: nothing to learn
        # about this prompt from it.
        usage = result.usage if not call.usage_offset else None
        routing = call.routing
        if usage is not None:
            call.pool.calibration.observe(routing.key, usage.prompt_tokens)
        text = result.answer
        _policy(call).observe(
            Outcome(
                routing,
                decision,
                ok=ok,
                prompt_tokens=usage.prompt_tokens if usage else None,
                cached_tokens=usage.cached_tokens if usage and usage.cached_reported else None,
                # A non-streamed answer's first byte comes when it is complete: no TTFT.
                ttft_s=result.ttft_s if call.stream else None,
                answer_key=None
                if text is None or not ok
                else extend_key(routing.key, text, call.path.endswith("chat/completions")),
                share_insert=call.share_insert,
            )
        )


def _unanswered(call: UpstreamCall, decision: Decision) -> None:
    """Tell the policy the worker gave no first byte (refused or failed): it computed nothing,
    so what the pick indexed for it is undone."""
    _policy(call).observe(Outcome(call.routing, decision, ok=False, unanswered=True))


def _policy(call: UpstreamCall) -> Policy:
    """The decode step of a P/D pool picks by load; every other call by the pool's policy."""
    pool = call.pool
    if call.stage == "decode" and pool.decode_policy is not None:
        return pool.decode_policy
    return pool.policy


def _role(call: UpstreamCall) -> Role | None:
    return "prefill" if call.stage == "prefill" else "decode" if call.stage == "decode" else None
