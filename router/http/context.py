"""Typed app and request keys, and the per-app state object handlers read.

Everything the gateway builds lives in one `GatewayState` under one app key (no globals).
"""

from __future__ import annotations

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


def new_request_id(incoming: str | None) -> str:
    if incoming and len(incoming) <= 128 and incoming.isprintable():
        return incoming
    return uuid.uuid4().hex


def access_of(request: web.Request) -> CallResult | None:
    return request.get(ACCESS)
