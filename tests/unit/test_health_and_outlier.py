"""Health thresholds and outlier ejection, driven directly (no network)."""

from __future__ import annotations

import time

from router.config import HealthConfig, OutlierConfig, parse_config
from router.domain.registry import Registry
from router.domain.worker import Health
from router.metrics import GatewayMetrics
from router.routing.factory import PoolRoutingFactory
from router.upstream.health import HealthChecker
from router.upstream.outlier import OutlierDetector


def _registry(n: int) -> Registry:
    workers = [{"url": f"http://127.0.0.1:{9000 + i}"} for i in range(n)]
    return Registry(
        parse_config({"auth": {"enabled": False}, "pools": {"m": {"workers": workers}}}),
        PoolRoutingFactory(),
    )


def test_new_workers_start_unproven_and_need_the_healthy_threshold() -> None:
    registry = _registry(1)
    (worker,) = registry.workers()
    assert worker.health is Health.UNPROVEN and not worker.routable
    metrics = GatewayMetrics(registry.workers)
    checker = HealthChecker(
        registry,
        None,  # type: ignore[arg-type]  # record() never touches the session
        HealthConfig(healthy_threshold=2, unhealthy_threshold=3),
        metrics,
    )
    checker.record(worker, True, "ok")
    assert worker.health is Health.UNPROVEN
    checker.record(worker, True, "ok")
    assert worker.health.value == "healthy" and worker.routable  # (mypy narrowed it to UNPROVEN)
    checker.record(worker, False, "down")
    checker.record(worker, False, "down")
    assert worker.health is Health.HEALTHY  # two failures are under the threshold of three
    checker.record(worker, True, "ok")  # a pass resets the streak
    for _ in range(3):
        checker.record(worker, False, "down")
    assert worker.health is Health.UNHEALTHY and not worker.routable


def test_ejection_grows_and_never_takes_more_than_the_share() -> None:
    registry = _registry(4)
    workers = list(registry.workers())
    for w in workers:
        w.health = Health.HEALTHY
    metrics = GatewayMetrics(registry.workers)
    config = OutlierConfig(consecutive_failures=2, base_ejection_s=10, max_ejected_share=0.5)
    outlier = OutlierDetector(registry, config, metrics)
    first = workers[0]
    outlier.failure(first, "connect")
    assert first.routable  # one failure is not enough
    outlier.failure(first, "connect")
    assert not first.routable
    first_duration = first.ejected_until - time.monotonic()
    assert 9 < first_duration <= 10
    first.ejected_until = 1.0  # (as if the ejection had expired)
    outlier.success(first)
    outlier.failure(first, "reset")
    outlier.failure(first, "reset")
    assert first.ejected_until - time.monotonic() > 15  # the second ejection lasts longer
    outlier.failure(workers[1], "x")
    outlier.failure(workers[1], "x")
    assert not workers[1].routable  # 2 of 4 ejected: the share is reached
    outlier.failure(workers[2], "x")
    outlier.failure(workers[2], "x")
    assert workers[2].routable  # a third would exceed max_ejected_share
    pool = registry.pools["m"]
    assert [w for w in pool.candidates()] == [workers[2], workers[3]]


def test_panic_mode_routes_to_ejected_workers_when_none_is_left() -> None:
    registry = _registry(2)
    for w in registry.workers():
        w.health = Health.HEALTHY
        w.ejected_until = time.monotonic() + 60
    assert len(registry.pools["m"].candidates()) == 2
