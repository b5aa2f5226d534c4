"""Dynamic LoRA: load an adapter onto a worker when no routable worker lists it.

Only for pools with `dynamic_lora: true` (vLLM serves `/v1/load_lora_adapter` only with
`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`). One load per pool and adapter at a time: requests that
arrive while it runs wait for it rather than loading the adapter onto every worker. The worker
chosen is the routable one where the adapter costs least (a free slot before a full one), then
the least busy. A load that fails is counted and the request gets the 503 it would have had.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from router.domain.pool import Pool
from router.domain.worker import Worker
from router.errors import NoCapacity
from router.metrics import GatewayMetrics
from router.supervisor import redact

log = logging.getLogger("prefix_router.lora")

_SLOT_ORDER = {"active": 0, "room": 1, "full": 2}


class AdapterLoader:
    def __init__(
        self, session: aiohttp.ClientSession, metrics: GatewayMetrics, timeout_s: float = 30.0
    ) -> None:
        self._session = session
        self._metrics = metrics
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    async def ensure(self, pool: Pool, adapter: str, path: str | None) -> None:
        """Return once some routable worker of `pool` lists `adapter`; raise NoCapacity when
        none does and none can be made to."""
        if pool.candidates(adapter):
            return
        unavailable = NoCapacity(
            f"no healthy worker serves adapter `{adapter}` now", retry_after_s=1.0
        )
        if not pool.config.dynamic_lora or path is None:
            raise unavailable
        lock = self._locks.setdefault((pool.name, adapter), asyncio.Lock())
        async with lock:
            if pool.candidates(adapter):
                return  # another request loaded it while this one waited
            workers = pool.candidates()
            if not workers:
                raise unavailable
            worker = min(
                workers, key=lambda w: (_SLOT_ORDER[w.adapter_state(adapter)], w.fleet_in_flight)
            )
            if not await self._load(worker, adapter, path):
                self._metrics.lora_loads.labels(pool.name, "failed").inc()
                raise unavailable
            self._metrics.lora_loads.labels(pool.name, "loaded").inc()
            worker.adapters = {**worker.adapters, adapter: path}
        if len(self._locks) > 1024:
            self._locks = {k: v for k, v in self._locks.items() if v.locked()}

    async def _load(self, worker: Worker, adapter: str, path: str) -> bool:
        body = {"lora_name": adapter, "lora_path": path}
        try:
            async with self._session.post(
                worker.endpoint.url("/v1/load_lora_adapter"),
                json=body,
                timeout=self._timeout,
                ssl=worker.ssl or True,
            ) as resp:
                text = await resp.text()
                # 400 "already loaded": it serves the adapter, its listing was only stale.
                if resp.status == 200 or (resp.status == 400 and "already" in text):
                    log.info("loaded adapter %s on worker %s", adapter, worker.id)
                    return True
                log.warning(
                    "loading adapter %s on worker %s answered %d: %s",
                    adapter,
                    worker.id,
                    resp.status,
                    redact(text[:200]),
                )
        except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError) as exc:
            log.warning(
                "loading adapter %s on worker %s failed: %s",
                adapter,
                worker.id,
                redact(f"{type(exc).__name__}: {exc}"),
            )
        return False
