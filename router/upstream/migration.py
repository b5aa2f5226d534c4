"""Stream migration: when a worker breaks mid-answer, another worker continues it.

The continuation is a new request that extends the original (`continuation`): the pool's policy
routes it like any request, so a worker holding the prefix wins, never one this request already
used. Each request migrates at most its pool's `migrations` times, inside its total deadline;
a pool-wide cap on continuations being dispatched at once protects a fleet that just lost a
worker with many streams on it. Migrations do not draw on the retry budget (a mass failure
would empty it exactly when migrating matters most); a continuation that fails before its own
first byte is retried like any request, within the same migration. Every attempt is counted by
the cause of the break and its outcome.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging

from router.domain.policy import RoutingRequest
from router.errors import GatewayError
from router.metrics import GatewayMetrics
from router.routing.key import routing_key
from router.upstream.continuation import SeamRewriter, continuation_body
from router.upstream.dispatch import Dispatcher
from router.upstream.stream import Answer

log = logging.getLogger("prefix_router.migration")


class Migrator:
    def __init__(self, dispatcher: Dispatcher, metrics: GatewayMetrics) -> None:
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._in_flight: dict[str, int] = {}

    def _refusal(self, answer: Answer, deadline: float) -> str | None:
        call = answer.call
        plan, transcript = call.migration, call.transcript
        if plan is None:
            return "not_enabled"
        if plan.refused is not None:
            return plan.refused
        if transcript is None:
            return "not_enabled"
        if plan.allowed <= 0:
            return "limit"
        if transcript.tool_calls:
            return "tool_calls"
        if transcript.identity is None:
            return "no_identity"
        pool = call.pool
        if self._in_flight.get(pool.name, 0) >= pool.config.migrations_in_flight:
            return "busy"
        if asyncio.get_running_loop().time() >= deadline:
            return "deadline"
        return None

    async def resume(self, answer: Answer, cause: str, deadline: float) -> Answer | None:
        """The rest of a broken stream from another worker, or None (the client then gets
        the error event)."""
        reason = self._refusal(answer, deadline)
        if reason is not None:
            self._metrics.stream_migrations.labels(cause, reason).inc()
            return None
        call = answer.call
        plan, transcript = call.migration, call.transcript
        assert plan is not None and transcript is not None and transcript.identity is not None
        text = transcript.text()
        if text is None:
            self._metrics.stream_migrations.labels(cause, "too_long").inc()
            return None
        sent = transcript.tokens
        body = continuation_body(plan.body, plan.kind, text, sent)
        if body is None:
            self._metrics.stream_migrations.labels(cause, "nothing_left").inc()
            return None
        key = routing_key(body, plan.kind)
        pool = call.pool
        plan.allowed -= 1
        plan.used.add(answer.worker)
        rest = dataclasses.replace(
            call,
            body=json.dumps(body, separators=(",", ":")).encode(),
            routing=RoutingRequest(
                model=call.routing.model,
                key=key,
                prompt_tokens=pool.calibration.estimate_tokens(key),
                max_tokens=max(1, call.routing.max_tokens - sent),
                session_id=call.routing.session_id,
                partition=call.routing.partition,
            ),
            seam=SeamRewriter(transcript.identity, plan.kind, sent),
            usage_offset=sent,
            collect_answer=False,
            # In a P/D pool the continuation is a new P/D request: prefill, then decode.
            stage=None,
            cached_override=None,
            params_single_use=False,
            retry_silence=True,
        )
        self._in_flight[pool.name] = self._in_flight.get(pool.name, 0) + 1
        try:
            continued = await self._dispatcher.dispatch(rest, answer.result, deadline, plan.used)
        except (GatewayError, TimeoutError) as exc:
            self._metrics.stream_migrations.labels(cause, "failed").inc()
            log.warning("stream of request %s could not migrate: %s", call.request_id, exc)
            return None
        finally:
            self._in_flight[pool.name] -= 1
        plan.used.add(continued.worker)
        self._metrics.stream_migrations.labels(cause, "migrated").inc()
        log.info(
            "stream of request %s migrated from %s to %s after %d tokens (%s)",
            call.request_id,
            answer.worker.id,
            continued.worker.id,
            sent,
            cause,
        )
        return continued
