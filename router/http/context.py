"""Typed app and request keys, and the per-app state object handlers read.

Everything the gateway builds lives in one `GatewayState` under one app key (no globals).
"""

from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from router.auth import Authenticator
from router.config import GatewayConfig
from router.metrics import GatewayMetrics
from router.upstream.proxy import CallResult, Proxy
from router.upstream.registry import Registry


@dataclass(eq=False)
class GatewayState:
    config: GatewayConfig
    registry: Registry
    metrics: GatewayMetrics
    auth: Authenticator
    session: aiohttp.ClientSession | None = None
    proxy: Proxy = field(init=False)
    started_at: float = field(default_factory=time.monotonic)
    started_at_wall: float = field(default_factory=time.time)
    draining: bool = False


STATE = web.AppKey("gateway_state", GatewayState)
REQUEST_ID = web.RequestKey("request_id", str)
ACCESS = web.RequestKey("access", CallResult)


def state_of(request: web.Request) -> GatewayState:
    return request.app[STATE]


def request_id_of(request: web.Request) -> str:
    return str(request.get(REQUEST_ID, ""))


_ID_PREFIX = uuid.uuid4().hex[:16]
_id_counter = itertools.count(1)


def new_request_id(incoming: str | None) -> str:
    """The client's X-Request-Id when sane, else a new one: a per-process random prefix plus
    a counter (unique like a uuid4, without its cost on every request)."""
    if incoming and len(incoming) <= 128 and incoming.isprintable():
        return incoming
    return f"{_ID_PREFIX}{next(_id_counter):016x}"


def access_of(request: web.Request) -> CallResult | None:
    return request.get(ACCESS)
