"""Active health checks: `/health` and the model identity (`/v1/models`) of every worker.

The model listing also names the LoRA adapters a worker serves (cards with a `parent`): the
registry routes an adapter's requests to the workers that list it.

A worker starts unproven and becomes routable after `healthy_threshold` passing probes in a
row; `unhealthy_threshold` failing probes in a row take it out. Every worker is probed at once
when the checker starts, so a healthy worker is routable within one probe. Each transition is
logged once and counted. Whatever a worker answers, or however its probe breaks, is that
worker's failed probe: it never stops the checks of the rest of the fleet.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp

from router.config import HealthConfig
from router.domain.registry import Registry
from router.domain.worker import Health, Worker
from router.metrics import GatewayMetrics
from router.supervisor import redact

log = logging.getLogger("prefix_router.health")


@dataclass(slots=True)
class _Streak:
    passes: int = 0
    fails: int = 0


def served_models(listing: object) -> set[str] | None:
    """The model ids an OpenAI `/v1/models` answer lists; None when it has not that shape."""
    if not isinstance(listing, dict):
        return None
    data = listing.get("data")
    if not isinstance(data, list):
        return None
    return {m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)}


def listed_adapters(listing: object) -> dict[str, str]:
    """The LoRA adapters in a vLLM `/v1/models` answer: cards with a `parent` (the base
    model), as name -> path (`root`)."""
    data = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(data, list):
        return {}
    return {
        card["id"]: card["root"] if isinstance(card.get("root"), str) else card["id"]
        for card in data
        if isinstance(card, dict)
        and isinstance(card.get("id"), str)
        and isinstance(card.get("parent"), str)
    }


class HealthChecker:
    def __init__(
        self,
        registry: Registry,
        session: aiohttp.ClientSession,
        config: HealthConfig,
        metrics: GatewayMetrics,
    ) -> None:
        self._registry = registry
        self._session = session
        self._config = config
        self._metrics = metrics
        self._streaks: dict[str, _Streak] = {}
        self.on_change: list[Callable[[Worker], Awaitable[None] | None]] = []

    def reconfigure(self, config: HealthConfig) -> None:
        self._config = config

    async def run(self) -> None:
        while True:
            await self.probe_all()
            await asyncio.sleep(self._config.interval_s)

    async def probe_all(self) -> None:
        workers = list(self._registry.workers())
        if workers:
            await asyncio.gather(*(self._probe_and_record(w) for w in workers))

    async def _probe_and_record(self, worker: Worker) -> None:
        try:
            ok, why = await self.probe(worker)
        except Exception as exc:
            # A probe that broke in a way nobody foresaw fails this worker alone; the others'
            # probes in the same round go on.
            ok, why = False, redact(f"probe failed: {type(exc).__name__}: {exc}")
        self.record(worker, ok, why)

    async def probe(self, worker: Worker) -> tuple[bool, str]:
        timeout = aiohttp.ClientTimeout(total=self._config.timeout_s)
        try:
            async with self._session.get(
                worker.endpoint.url("/health"), timeout=timeout, ssl=worker.ssl or True
            ) as resp:
                if resp.status != 200:
                    return False, f"/health answered {resp.status}"
                await resp.read()
            if not self._config.check_model:
                return True, "ok"
            async with self._session.get(
                worker.endpoint.url("/v1/models"), timeout=timeout, ssl=worker.ssl or True
            ) as resp:
                if resp.status != 200:
                    return False, f"/v1/models answered {resp.status}"
                listing = await resp.json(content_type=None)
            served = served_models(listing)
            if served is None:
                return False, "/v1/models answered no OpenAI model list"
            if worker.pool not in served:
                return False, f"serves {sorted(served)[:8]}, not {worker.pool!r}"
            adapters = listed_adapters(listing)
            if adapters != worker.adapters:
                worker.adapters = adapters
            return True, "ok"
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return False, f"{type(exc).__name__}: {exc}".rstrip(": ")

    def record(self, worker: Worker, ok: bool, why: str) -> None:
        streak = self._streaks.setdefault(worker.id, _Streak())
        if ok:
            streak.passes += 1
            streak.fails = 0
            if worker.health is not Health.HEALTHY and streak.passes >= (
                self._config.healthy_threshold
            ):
                self._transition(worker, Health.HEALTHY, why)
        else:
            streak.fails += 1
            streak.passes = 0
            if worker.health is Health.HEALTHY and streak.fails >= self._config.unhealthy_threshold:
                self._transition(worker, Health.UNHEALTHY, why)
            elif worker.health is Health.UNPROVEN and streak.fails == 1:
                log.warning("worker %s (%s) not healthy yet: %s", worker.id, worker.url, why)

    def _transition(self, worker: Worker, to: Health, why: str) -> None:
        before = worker.health
        worker.health = to
        self._metrics.health_transitions.labels(to.value).inc()
        level = logging.INFO if to is Health.HEALTHY else logging.WARNING
        log.log(
            level, "worker %s (%s) %s -> %s: %s", worker.id, worker.url, before.value, to.value, why
        )
        for callback in self.on_change:
            callback(worker)

    def forget(self, worker_id: str) -> None:
        self._streaks.pop(worker_id, None)
