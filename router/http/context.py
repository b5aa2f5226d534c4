"""Typed app and request keys, and the per-app state object handlers read.

Everything the gateway builds lives in one `GatewayState` under one app key (no globals).
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from router.admission import Admission
from router.auth import Authenticator
from router.config import ConfigError, GatewayConfig, load_config
from router.config.changes import restart_needed
from router.domain.registry import Registry
from router.logs import set_log_level
from router.metrics import GatewayMetrics
from router.ratelimit import RateLimiter
from router.result_cache import ResultCache
from router.state.backend import StateBackend
from router.state.fleet_sync import FleetSync
from router.stats import Stats
from router.upstream.dispatch import Dispatcher
from router.upstream.lora_loader import AdapterLoader
from router.upstream.migration import Migrator

log = logging.getLogger("prefix_router")


@dataclass(eq=False)
class GatewayState:
    config: GatewayConfig
    registry: Registry
    metrics: GatewayMetrics
    auth: Authenticator
    backend: StateBackend
    limiter: RateLimiter
    admission: Admission
    result_cache: ResultCache
    fleet: FleetSync
    session: aiohttp.ClientSession | None = None
    dispatcher: Dispatcher = field(init=False)
    migrator: Migrator = field(init=False)
    adapters: AdapterLoader = field(init=False)
    started_at: float = field(default_factory=time.monotonic)
    started_at_wall: float = field(default_factory=time.time)
    draining: bool = False
    stats: Stats = field(default_factory=Stats)
    config_path: str | None = None
    on_reload: list[Callable[[GatewayConfig], None]] = field(default_factory=list)

    async def reload(self) -> list[tuple[str, str]]:
        """Re-read the routing YAML; validate first, swap atomically, keep the old on error.

        Returns the problems found (empty on success). Every section is applied (pools,
        keys, limits, timeouts, retries, outlier, health, scraping, logging, debug headers)
        except the listen address, the state backend and the drain timeout: a file that
        changes those is refused, naming the fields, rather than half applied.
        """
        if self.config_path is None:
            return [("(file)", "started without --config: there is no file to reload")]
        try:
            # A small local file read once per reload; not on any request path.
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.warning("reload refused, keeping the running config: %s", exc)
            return exc.problems
        problems = restart_needed(self.config, new)
        if problems:
            log.warning(
                "reload refused, keeping the running config: %s",
                ", ".join(path for path, _ in problems) + " need a restart",
            )
            return problems
        if new.log_level != self.config.log_level:
            set_log_level(new.log_level)
        gone = self.registry.apply(new)
        self.auth = Authenticator(new.auth)
        self.config = new
        for hook in self.on_reload:
            hook(new)
        log.info("config reloaded from %s (%d workers left)", self.config_path, len(gone))
        return []


STATE = web.AppKey("gateway_state", GatewayState)


def state_of(request: web.Request) -> GatewayState:
    return request.app[STATE]


_ID_PREFIX = uuid.uuid4().hex[:16]
_id_counter = itertools.count(1)


def new_request_id(incoming: str | None) -> str:
    """The client's X-Request-Id when sane, else a new one: a per-process random prefix plus
    a counter (unique like a uuid4, without its cost on every request).

    Sane is printable ASCII: the id goes into the upstream request and back to the client as
    a header, and anything else either cannot be written there (not latin-1) or reaches the
    worker as bytes it decodes differently."""
    if incoming and len(incoming) <= 128 and incoming.isascii() and incoming.isprintable():
        return incoming
    return f"{_ID_PREFIX}{next(_id_counter):016x}"
