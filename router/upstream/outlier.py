"""Passive outlier ejection (Envoy's model, small).

Every ending of an upstream attempt is reported here. `consecutive_failures` failures in a row
eject the worker for `base_ejection_s x 2^(ejections so far)`, capped; a success resets the
streak. A broken stream counts as a failure of its worker. Never more than `max_ejected_share`
of a pool is ejected at once; when every worker of a pool is ejected, `Pool.candidates` routes
to all of them anyway (panic mode). Each ejection and return is logged once and counted.
"""

from __future__ import annotations

import logging
import time

from router.config import OutlierConfig
from router.domain.registry import Registry
from router.domain.worker import Worker
from router.metrics import GatewayMetrics

log = logging.getLogger("prefix_router.outlier")


class OutlierDetector:
    def __init__(self, registry: Registry, config: OutlierConfig, metrics: GatewayMetrics) -> None:
        self._registry = registry
        self._config = config
        self._metrics = metrics

    def reconfigure(self, config: OutlierConfig) -> None:
        self._config = config

    def success(self, worker: Worker) -> None:
        worker.consecutive_failures = 0
        if worker.ejections and worker.ejected_until and worker.ejected_until <= time.monotonic():
            worker.ejected_until = 0.0
            log.info("worker %s back in rotation after ejection", worker.id)
            self._metrics.health_transitions.labels("returned").inc()

    def failure(self, worker: Worker, cause: str) -> None:
        worker.consecutive_failures += 1
        if worker.consecutive_failures < self._config.consecutive_failures:
            return
        now = time.monotonic()
        if worker.ejected_until > now:
            return
        pool = self._registry.pools.get(worker.pool)
        if pool is not None:
            ejected = sum(1 for w in pool.workers if w.ejected_until > now)
            if (ejected + 1) > self._config.max_ejected_share * len(pool.workers):
                return
        duration = min(
            self._config.max_ejection_s, self._config.base_ejection_s * 2**worker.ejections
        )
        worker.ejections += 1
        worker.ejected_until = now + duration
        worker.consecutive_failures = 0
        self._metrics.ejections.labels(cause).inc()
        self._metrics.health_transitions.labels("ejected").inc()
        log.warning(
            "worker %s ejected for %.1fs after %d consecutive failures (last: %s)",
            worker.id,
            duration,
            self._config.consecutive_failures,
            cause,
        )
