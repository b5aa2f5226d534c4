"""Operational endpoints: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from router.http.context import state_of


async def health(request: web.Request) -> web.Response:
    """Liveness: the process answers. `is_ready` mirrors `/ready` (seed API field)."""
    state = state_of(request)
    ready = _ready(request)
    return web.json_response(
        {"status": "draining" if state.draining else "healthy", "is_ready": ready}
    )


def _ready(request: web.Request) -> bool:
    state = state_of(request)
    if state.draining:
        return False
    return all(pool.has_healthy_worker() for pool in state.registry.pools.values())


async def ready(request: web.Request) -> web.Response:
    state = state_of(request)
    pools = {name: pool.has_healthy_worker() for name, pool in state.registry.pools.items()}
    ok = _ready(request)
    return web.json_response(
        {"ready": ok, "draining": state.draining, "pools": pools}, status=200 if ok else 503
    )


async def metrics(request: web.Request) -> web.Response:
    body = state_of(request).metrics.render()
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response
