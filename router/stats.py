"""The cost and capacity view behind `GET /stats`: running totals per pool and per worker.

The edge middleware records every model request once, after it ended. Totals are plain sums
(requests, tokens, times), so memory is one small record per pool and per worker, never per
request. Derived figures (averages, throughput, prefill time saved by cache hits, cost per
million tokens) are computed only when someone asks, from the sums, the uptime and the pool's
configuration.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from router.upstream.sse import Usage

# Workers discovered at run time come and go; their tallies must not accumulate forever.
MAX_WORKER_TALLIES = 4096


@dataclass(slots=True)
class Tally:
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    time_s: float = 0.0
    ttft_sum_s: float = 0.0
    ttft_count: int = 0

    def add(self, ok: bool, duration_s: float, ttft_s: float | None, usage: Usage | None) -> None:
        self.requests += 1
        if not ok:
            self.errors += 1
        self.time_s += duration_s
        if ttft_s is not None:
            self.ttft_sum_s += ttft_s
            self.ttft_count += 1
        if usage is not None:
            self.prompt_tokens += usage.prompt_tokens
            self.completion_tokens += usage.completion_tokens
            self.cached_tokens += usage.cached_tokens

    def view(
        self,
        uptime_s: float,
        prefill_tokens_per_s: float,
        cost_per_gpu_hour: float | None,
        workers: int,
    ) -> dict[str, Any]:
        """Totals plus the figures an operator sizes a fleet with."""
        total_tokens = self.prompt_tokens + self.completion_tokens
        cost: float | None = None
        cost_completion: float | None = None
        if cost_per_gpu_hour is not None:
            spent = cost_per_gpu_hour * workers * uptime_s / 3600.0
            cost = spent / total_tokens * 1e6 if total_tokens else None
            cost_completion = (
                spent / self.completion_tokens * 1e6 if self.completion_tokens else None
            )
        return {
            "requests": self.requests,
            "errors": self.errors,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "completion_tokens_per_s": _ratio(self.completion_tokens, uptime_s),
            "avg_ttft_s": _ratio(self.ttft_sum_s, self.ttft_count),
            "prefill_saved_s": round(self.cached_tokens / prefill_tokens_per_s, 6),
            "cost_per_million_tokens": _round(cost),
            "cost_per_million_completion_tokens": _round(cost_completion),
            "uptime_s": round(uptime_s, 3),
        }


@dataclass(slots=True)
class PoolFacts:
    """What the view needs to know about a pool besides its tallies."""

    name: str
    worker_ids: list[str]
    prefill_tokens_per_s: float
    cost_per_gpu_hour: float | None


@dataclass(eq=False)
class Stats:
    clock: Callable[[], float] = time.monotonic
    total: Tally = field(default_factory=Tally)
    pools: dict[str, Tally] = field(default_factory=dict)
    workers: dict[str, Tally] = field(default_factory=dict)
    started_at: float = field(init=False)

    def __post_init__(self) -> None:
        self.started_at = self.clock()

    def uptime_s(self) -> float:
        return self.clock() - self.started_at

    def record(
        self,
        pool: str | None,
        worker: str | None,
        ok: bool,
        duration_s: float,
        ttft_s: float | None,
        usage: Usage | None,
    ) -> None:
        self.total.add(ok, duration_s, ttft_s, usage)
        if pool is not None:
            tally = self.pools.get(pool)
            if tally is None:
                tally = self.pools[pool] = Tally()
            tally.add(ok, duration_s, ttft_s, usage)
        if worker is not None:
            tally = self.workers.get(worker)
            if tally is None:
                if len(self.workers) >= MAX_WORKER_TALLIES:
                    del self.workers[next(iter(self.workers))]
                tally = self.workers[worker] = Tally()
            tally.add(ok, duration_s, ttft_s, usage)

    def forget_workers(self, keep: Iterable[str]) -> None:
        """Drop tallies of workers that left the fleet."""
        kept = set(keep)
        for worker_id in [w for w in self.workers if w not in kept]:
            del self.workers[worker_id]

    def view(self, pools: list[PoolFacts]) -> dict[str, Any]:
        """The seed API's top-level fields, then ours per pool and per worker."""
        uptime_s = self.uptime_s()
        total = self.total
        requests = total.requests
        body: dict[str, Any] = {
            "request_count": requests,
            "total_tokens_generated": total.completion_tokens,
            "total_inference_time": round(total.time_s, 6),
            "avg_tokens_per_request": _ratio(total.completion_tokens, requests),
            "avg_time_per_request": _ratio(total.time_s, requests),
            "avg_tokens_per_second": _ratio(total.completion_tokens, total.time_s),
            "uptime": format_uptime(uptime_s),
            "uptime_s": round(uptime_s, 3),
        }
        pool_views: dict[str, Any] = {}
        worker_views: dict[str, Any] = {}
        for facts in pools:
            tally = self.pools.get(facts.name, Tally())
            view = tally.view(
                uptime_s, facts.prefill_tokens_per_s, facts.cost_per_gpu_hour, len(facts.worker_ids)
            )
            view["workers"] = len(facts.worker_ids)
            pool_views[facts.name] = view
            for worker_id in facts.worker_ids:
                worker_tally = self.workers.get(worker_id, Tally())
                worker_view = worker_tally.view(
                    uptime_s, facts.prefill_tokens_per_s, facts.cost_per_gpu_hour, 1
                )
                worker_view["pool"] = facts.name
                worker_views[worker_id] = worker_view
        body["pools"] = pool_views
        body["workers"] = worker_views
        return body


def format_uptime(seconds: float) -> str:
    """The seed API's uptime string: "2 days, 14 hours, 32 minutes"."""
    minutes_total = int(seconds // 60)
    days, rest = divmod(minutes_total, 24 * 60)
    hours, minutes = divmod(rest, 60)
    return f"{days} days, {hours} hours, {minutes} minutes"


def _ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 6) if denominator else 0.0


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
