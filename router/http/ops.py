"""Operational endpoints: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from router.http.context import GatewayState, state_of

BACKEND_TYPE = "vllm"


async def health(request: web.Request) -> web.Response:
    """Liveness: the process answers. The seed API's fields ride along: `is_ready` mirrors
    `/ready`, `is_loaded` says some worker can serve (a gateway loads no model itself)."""
    state = state_of(request)
    return web.json_response(
        {
            "status": "draining" if state.draining else "healthy",
            "is_ready": is_ready(state),
            "is_loaded": is_loaded(state),
            "backend_type": BACKEND_TYPE,
        }
    )


def is_ready(state: GatewayState) -> bool:
    if state.draining:
        return False
    return all(pool.has_healthy_worker() for pool in state.registry.pools.values())


def is_loaded(state: GatewayState) -> bool:
    return any(pool.has_healthy_worker() for pool in state.registry.pools.values())


def _ready(request: web.Request) -> bool:
    return is_ready(state_of(request))


async def ready(request: web.Request) -> web.Response:
    state = state_of(request)
    pools = {name: pool.has_healthy_worker() for name, pool in state.registry.pools.items()}
    ok = _ready(request)
    return web.json_response(
        {"ready": ok, "draining": state.draining, "pools": pools}, status=200 if ok else 503
    )


async def metrics(request: web.Request) -> web.Response:
    state = state_of(request)
    if not state.config.metrics.public:
        state.auth.require_admin(request.headers)
    body = state.metrics.render()
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response
