"""Prefill/decode disaggregation: a P/D pool's request runs on two workers, one after the other.

The prefill step sends the client's body to a prefill worker picked by the pool's prefix-aware
policy, changed as vLLM's NixlConnector requires (`reference/vllm-pd-lora-continuation.md` §1):
`kv_transfer_params` asking for a remote decode, one token, not streamed, no `stream_options`,
`min_tokens` at most 1. Its answer's `kv_transfer_params` (opaque, passed on byte for byte) go
with the client's own body to a decode worker picked by load, whose answer is the client's,
streamed or not; the same `X-Request-Id` goes to both. The decode worker counts the transferred
KV as cached, so the answer's `cached_tokens` is replaced by the prefill's.

Failures: a prefill that fails before answering is retried on another prefill worker (the
dispatcher's retries); when every prefill failed with a worker's error, the decode worker
prefills alone. A prefill answer without params (it finished early, or has no connector) goes
to decode without them: vLLM then prefills locally. A decode failure the worker never saw is
retried on another decode worker with the same params; one it saw may have spent them (the
prefill worker frees its blocks once they are read), so the request restarts once with a new
prefill. A pool may skip the prefill step when a decode worker already holds all but a few of
the prompt's tokens (`pd_min_uncached_tokens`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from router.domain.policy import EstimatesCached, SharesInserts
from router.domain.worker import Worker
from router.errors import GatewayError
from router.metrics import GatewayMetrics
from router.upstream.call import CallResult, UpstreamCall
from router.upstream.stream import Answer

Dispatch = Callable[[UpstreamCall, CallResult, float, "set[Worker] | None"], Awaitable[Answer]]

REMOTE_DECODE: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


class ParamsSpent(Exception):
    """A decode worker saw the request and failed: the transfer params may be used up."""


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """The prefill step's body: one token, not streamed, asking for a remote decode."""
    out = {**body, "kv_transfer_params": dict(REMOTE_DECODE), "stream": False, "max_tokens": 1}
    out.pop("stream_options", None)
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    if isinstance(out.get("min_tokens"), int) and out["min_tokens"] > 1:
        out["min_tokens"] = 1  # vLLM refuses min_tokens > max_tokens
    return out


def decode_body(body: dict[str, Any], params: Any) -> dict[str, Any]:
    """The client's own body, with the prefill's params (none: the decode prefills itself)."""
    out = dict(body)
    if params is None:
        out.pop("kv_transfer_params", None)
    else:
        out["kv_transfer_params"] = params
    return out


@dataclass(slots=True)
class Prefilled:
    params: Any
    """The prefill answer's `kv_transfer_params`, verbatim; None when it had none."""
    cached_tokens: int | None
    worker: Worker
    block_keys: list[int] | None


class Disaggregation:
    def __init__(self, dispatch: Dispatch, metrics: GatewayMetrics) -> None:
        self._dispatch = dispatch
        self._steps = metrics.pd_steps

    async def run(
        self, call: UpstreamCall, result: CallResult, deadline: float, exclude: set[Worker] | None
    ) -> Answer:
        """The answer of the decode step (or of a decode worker alone), with its first byte."""
        if not result.started_at:
            result.started_at = time.perf_counter()  # TTFT counts the prefill step too
        pool = call.pool.name
        original = json.loads(call.body)
        if self._decode_alone(call):
            self._steps.labels(pool, "decode", "alone").inc()
            return await self._alone(call, result, deadline, exclude)
        for restart in (False, True):
            prefilled = await self._prefill(call, original, deadline)
            if prefilled is None:
                self._steps.labels(pool, "prefill", "failed").inc()
                return await self._alone(call, result, deadline, exclude)
            result.prefill_worker = prefilled.worker.id
            if prefilled.params is None:
                self._steps.labels(pool, "prefill", "no_params").inc()
            decode = dataclasses.replace(
                call,
                stage="decode",
                on_decision=None,  # sessions and the index follow the prefill worker
                body=json.dumps(decode_body(original, prefilled.params)).encode(),
                cached_override=prefilled.cached_tokens,
                params_single_use=prefilled.params is not None and not restart,
            )
            try:
                answer = await self._dispatch(decode, result, deadline, exclude)
            except ParamsSpent:
                # Not the worker's fault necessarily (outlier detection judges that): the same
                # decode worker may take the restarted request.
                self._steps.labels(pool, "decode", "restarted").inc()
                continue
            self._steps.labels(pool, "decode", "ok").inc()
            policy = call.pool.policy
            if prefilled.block_keys and isinstance(policy, SharesInserts):
                # The decode worker keeps the prompt's KV it was sent, as its own cache.
                policy.apply_remote_insert(answer.worker.id, prefilled.block_keys)
            return answer
        raise AssertionError("unreachable: the second round does not restart")

    def _decode_alone(self, call: UpstreamCall) -> bool:
        """The pool's decider: a decode worker holds all but a few of the prompt's tokens."""
        threshold = call.pool.config.pd_min_uncached_tokens
        policy = call.pool.policy
        if threshold is None or not isinstance(policy, EstimatesCached):
            return False
        decoders = call.pool.candidates(call.routing.adapter, "decode")
        if not decoders:
            return False
        cached = max(policy.cached_tokens(call.routing, decoders))
        return call.routing.prompt_tokens - cached < threshold

    async def _alone(
        self, call: UpstreamCall, result: CallResult, deadline: float, exclude: set[Worker] | None
    ) -> Answer:
        return await self._dispatch(
            dataclasses.replace(call, stage="alone"), result, deadline, exclude
        )

    async def _prefill(
        self, call: UpstreamCall, original: dict[str, Any], deadline: float
    ) -> Prefilled | None:
        """Run the prefill step; None when no prefill worker could (a worker's failure)."""
        step = dataclasses.replace(
            call,
            stage="prefill",
            body=json.dumps(prefill_body(original)).encode(),
            stream=False,
            client_wants_usage=True,
            transform=None,
            collect_answer=False,
            transcript=None,
            migration=None,
            seam=None,
            usage_offset=0,
        )
        outcome = CallResult()
        try:
            answer = await self._dispatch(step, outcome, deadline, None)
        except GatewayError as exc:
            if exc.status < 500:
                raise  # the client's error (a prompt too long): decode would refuse it too
            return None
        try:
            payload = json.loads(answer.body)
        except ValueError:
            payload = None
        finally:
            answer.close()
        params = payload.get("kv_transfer_params") if isinstance(payload, dict) else None
        usage = outcome.usage
        cached = usage.cached_tokens if usage is not None else None
        return Prefilled(params, cached, answer.worker, answer.decision.block_keys)
