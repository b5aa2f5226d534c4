"""build_app(config): the gateway as an aiohttp Application.

Everything is built here and stored under typed app keys; background work (health checks,
load scraping, discovery, the Redis followers) runs under one `Supervisor` and starts and stops
through `cleanup_ctx`. A test builds a fresh app.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from router.admission import Admission
from router.auth import Authenticator
from router.config import GatewayConfig, StateConfig
from router.domain.policy import SharesInserts
from router.domain.registry import Registry
from router.http import admin, openai, ops, seed, stats
from router.http.context import STATE, GatewayState
from router.http.middleware import edge
from router.metrics import GatewayMetrics
from router.ratelimit import RateLimiter
from router.result_cache import ResultCache
from router.routing.factory import PoolRoutingFactory
from router.state.backend import FleetBackend, StateBackend
from router.state.discovery import Discovery
from router.state.fleet_sync import FleetSync
from router.state.keys import Keys
from router.state.kv_follower import KVFollower
from router.state.memory import MemoryState
from router.state.redis_state import RedisState
from router.supervisor import Supervisor
from router.upstream.dispatch import Dispatcher
from router.upstream.health import HealthChecker
from router.upstream.load_scrape import LoadScraper
from router.upstream.lora_loader import AdapterLoader
from router.upstream.migration import Migrator
from router.upstream.outlier import OutlierDetector
from router.upstream.relay import Relay
from router.upstream.upstream_pool import UpstreamClient

SUPERVISOR = web.AppKey("supervisor", Supervisor)


def build_app(
    config: GatewayConfig, rng: random.Random | None = None, config_path: str | None = None
) -> web.Application:
    registry = Registry(config, PoolRoutingFactory(rng))
    metrics = GatewayMetrics(registry.workers)
    supervisor = Supervisor(metrics.background_restarts)
    backend = build_backend(config.state, metrics, supervisor)
    state = GatewayState(
        config=config,
        registry=registry,
        metrics=metrics,
        auth=Authenticator(config.auth),
        backend=backend,
        limiter=RateLimiter(
            backend, Keys(config.state.key_prefix), metrics, config.state.local_share
        ),
        admission=Admission(metrics),
        result_cache=ResultCache(backend, Keys(config.state.key_prefix)),
        fleet=FleetSync(
            backend,
            Keys(config.state.key_prefix),
            lambda pool, worker_id: _insert_target(registry, pool, worker_id),
        ),
        config_path=config_path,
    )
    state.limiter.tenant_labels = config.metrics.tenant_labels

    def follow_metrics_config(new: GatewayConfig) -> None:
        state.limiter.tenant_labels = new.metrics.tenant_labels

    state.on_reload.append(follow_metrics_config)
    # The body limit is enforced by read_body with a clear 413; aiohttp's own cap sits above it.
    app = web.Application(middlewares=[edge], client_max_size=config.limits.max_body_bytes + 1)
    app[STATE] = state
    app[SUPERVISOR] = supervisor
    app.router.add_post("/v1/chat/completions", openai.chat_completions)
    app.router.add_post("/v1/completions", openai.text_completions)
    app.router.add_get("/v1/models", openai.list_models)
    app.router.add_get("/health", ops.health)
    app.router.add_get("/ready", ops.ready)
    app.router.add_get("/metrics", ops.metrics)
    app.router.add_get("/stats", stats.stats)
    seed.register(app)
    admin.register(app)
    app.cleanup_ctx.append(_state_backend)
    app.cleanup_ctx.append(_upstream_client)
    app.cleanup_ctx.append(_background_tasks)
    return app


def _insert_target(registry: Registry, pool: str, worker_id: str) -> SharesInserts | None:
    """Where another replica's insert for this worker goes: the pool's policy, if it keeps an
    approximate index and the worker is one of the pool's. An insert naming a worker this
    gateway does not know (one that left, a stale or foreign entry) is ignored: applied, it would
    give a ghost a slot in the index that nothing ever frees."""
    found = registry.pools.get(pool)
    worker = registry.worker(worker_id)
    if found is None or worker is None or worker.pool != pool:
        return None
    policy = found.policy
    return policy if isinstance(policy, SharesInserts) else None


def build_backend(
    config: StateConfig, metrics: GatewayMetrics, supervisor: Supervisor | None = None
) -> StateBackend:
    if config.backend == "redis":
        assert config.redis_url is not None
        return RedisState(
            config.redis_url,
            config.timeout_s,
            cluster=config.cluster,
            on_up_change=lambda up: metrics.redis_up.set(up),
            supervisor=supervisor,
        )
    return MemoryState()


async def _state_backend(app: web.Application) -> AsyncIterator[None]:
    backend = app[STATE].backend
    await backend.start()
    yield
    await backend.close()


async def _upstream_client(app: web.Application) -> AsyncIterator[None]:
    """Upstream clients, built once (never per request): the lean one for the relay, aiohttp's
    for health checks and metric scrapes."""
    state = app[STATE]
    connector = aiohttp.TCPConnector(
        limit=0,
        limit_per_host=0,
        keepalive_timeout=30.0,
        enable_cleanup_closed=True,
    )
    session = aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
        raise_for_status=False,
    )
    state.session = session
    outlier = OutlierDetector(state.registry, state.config.outlier, state.metrics)
    client = UpstreamClient()
    # A worker that left keeps no idle connections open.
    state.registry.on_remove.append(lambda worker: client.forget(worker.url))
    relay = Relay(
        client, state.config.timeouts, state.config.retries, state.metrics.upstream_resends
    )
    state.dispatcher = Dispatcher(relay, state.config.retries, outlier, state.metrics)
    state.migrator = Migrator(state.dispatcher, state.metrics)
    state.adapters = AdapterLoader(session, state.metrics)
    state.on_reload.append(
        lambda config: state.dispatcher.reconfigure(config.timeouts, config.retries)
    )
    state.on_reload.append(lambda config: outlier.reconfigure(config.outlier))
    yield
    client.close()
    await session.close()
    state.registry.close()


async def _background_tasks(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    assert state.session is not None
    checker = HealthChecker(state.registry, state.session, state.config.health, state.metrics)
    checker.on_change.append(lambda _worker: state.admission.kick_all())
    state.registry.on_remove.append(lambda worker: checker.forget(worker.id))
    state.on_reload.append(lambda config: checker.reconfigure(config.health))
    scraper = LoadScraper(
        state.registry,
        state.session,
        state.config.load_scrape,
        shared_fleet=isinstance(state.backend, FleetBackend),
    )
    state.on_reload.append(lambda config: scraper.reconfigure(config.load_scrape))
    state.registry.on_remove.append(lambda worker: scraper.forget(worker.id))
    supervisor = app[SUPERVISOR]
    try:
        await _start_loops(state, supervisor, checker, scraper)
        yield
    finally:
        # Also when startup failed half-way: no loop outlives the app.
        await supervisor.stop()


async def _start_loops(
    state: GatewayState, supervisor: Supervisor, checker: HealthChecker, scraper: LoadScraper
) -> None:
    # Probe once before serving so a healthy worker is routable from the first request.
    await checker.probe_all()
    supervisor.start("health", checker.run)
    if state.config.load_scrape.enabled:
        await scraper.scrape_all()
        supervisor.start("load_scrape", scraper.run)
    backend = state.backend
    if isinstance(backend, FleetBackend):
        discovery = Discovery(
            state.registry,
            backend,
            Keys(state.config.state.key_prefix),
            state.config.state.discovery_interval_s,
        )
        await discovery.sync_once()
        if any(w.health.value == "unproven" for w in state.registry.workers()):
            await checker.probe_all()
        supervisor.start("discovery", discovery.run)
        supervisor.start("index_publisher", state.fleet.run_publisher)
        supervisor.start(
            "index_follower", lambda: state.fleet.run_follower(lambda: list(state.registry.pools))
        )
        kv_follower = KVFollower(
            state.registry,
            backend.redis_url,
            Keys(state.config.state.key_prefix),
            state.metrics,
            cluster=backend.cluster,
        )
        supervisor.start("kv_follower", kv_follower.run)
