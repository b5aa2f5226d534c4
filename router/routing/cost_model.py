"""The hybrid policy's cost model: estimated seconds to first token on one worker.

ttft = queue ahead / prefill rate + this request's uncached tokens / prefill rate
       + running sequences x decode_s_per_running.
Two sources describe the queue: `prefill_backlog_tokens`, the gateway's own fresh count of
uncached tokens dispatched there and not yet answered, and the worker's reported `waiting`
(scraped, maybe a second stale, but it also sees other gateways' traffic). Both describe mostly
the same requests, so the queue term takes the larger of the two estimates rather than their sum.
Likewise running sequences are the larger of the report and the gateway's `in_flight`.
"""

from __future__ import annotations

from router.config import HybridPolicy
from router.upstream.worker import Worker


class CostModel:
    def __init__(self, config: HybridPolicy) -> None:
        self._rate = config.prefill_tokens_per_s
        self._queue_s_per_waiting = config.queue_s_per_waiting
        self._decode_s_per_running = config.decode_s_per_running

    def queue_s(self, worker: Worker) -> float:
        """Prefill work already queued ahead of a new request on this worker."""
        backlog_s = worker.prefill_backlog_tokens / self._rate
        reported_s = worker.reported.waiting * self._queue_s_per_waiting
        return max(backlog_s, reported_s)

    def ttft_s(self, worker: Worker, uncached_tokens: int) -> float:
        running = max(worker.reported.running, worker.in_flight)
        return (
            self.queue_s(worker)
            + max(0, uncached_tokens) / self._rate
            + running * self._decode_s_per_running
        )
