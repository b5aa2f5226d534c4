"""The admin API: inspect workers and pools, drain a worker, reload the routing YAML.

Every endpoint needs an admin key (`Authenticator.require_admin`); with auth disabled in the
YAML everything is open, as the operator said explicitly. Draining takes a worker out of routing
for new requests only: requests already on it finish, because a drain flag is all `routable`
reads. A reload validates the new file first and keeps the running config on any problem.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from router.domain.worker import Worker
from router.errors import InvalidRequest, NotFound
from router.http.context import GatewayState, state_of

_WORKER = "/admin/workers/{worker_id:.+}"  # ids look like `pool/0`: let the id hold slashes


def register(app: web.Application) -> None:
    app.router.add_get("/admin/workers", list_workers)
    app.router.add_get("/admin/pools", list_pools)
    app.router.add_post(_WORKER + "/drain", drain_worker)
    app.router.add_post(_WORKER + "/undrain", undrain_worker)
    app.router.add_post("/admin/reload", reload_config)


def _admin_state(request: web.Request) -> GatewayState:
    state = state_of(request)
    state.auth.require_admin(request.headers)
    return state


def worker_view(worker: Worker, now: float) -> dict[str, Any]:
    reported = worker.reported
    return {
        "id": worker.id,
        "url": worker.url,
        "pool": worker.pool,
        "health": worker.health.value,
        "routable": worker.routable,
        "draining": worker.draining,
        "in_flight": worker.in_flight,
        "prefill_backlog_tokens": worker.prefill_backlog_tokens,
        "dispatched_total": worker.dispatched_total,
        "consecutive_failures": worker.consecutive_failures,
        "ejections": worker.ejections,
        "ejected_for_s": round(max(0.0, worker.ejected_until - now), 3),
        "reported_load": {
            "running": reported.running,
            "waiting": reported.waiting,
            "kv_usage": reported.kv_usage,
            "age_s": round(now - reported.updated_at, 3) if reported.updated_at else None,
        },
        "cache_capacity_blocks": worker.capacity_blocks,
        "block_size": reported.block_size,
    }


async def list_workers(request: web.Request) -> web.Response:
    state = _admin_state(request)
    now = time.monotonic()
    return web.json_response({"workers": [worker_view(w, now) for w in state.registry.workers()]})


async def list_pools(request: web.Request) -> web.Response:
    state = _admin_state(request)
    pools = []
    for name, pool in state.registry.pools.items():
        gate = state.admission.gate(pool)
        pools.append(
            {
                "name": name,
                "aliases": list(pool.config.aliases),
                "policy": pool.config.policy.model_dump(mode="json"),
                "fallback_pools": list(pool.config.fallback_pools),
                "workers": [w.id for w in pool.workers],
                "healthy_workers": sum(1 for w in pool.workers if w.routable),
                "in_flight": sum(w.in_flight for w in pool.workers),
                "admission": {
                    "admitted": gate.in_flight,
                    "capacity": gate.capacity(),
                    "saturated": gate.saturated,
                },
                "cost_per_gpu_hour": pool.config.cost_per_gpu_hour,
            }
        )
    return web.json_response({"pools": pools})


def _worker_or_404(state: GatewayState, request: web.Request) -> Worker:
    worker_id = request.match_info["worker_id"]
    worker = state.registry.worker(worker_id)
    if worker is None:
        raise NotFound(f"no worker with id `{worker_id}`", param="id", code="worker_not_found")
    return worker


async def drain_worker(request: web.Request) -> web.Response:
    state = _admin_state(request)
    worker = _worker_or_404(state, request)
    worker.draining = True
    return web.json_response(worker_view(worker, time.monotonic()))


async def undrain_worker(request: web.Request) -> web.Response:
    state = _admin_state(request)
    worker = _worker_or_404(state, request)
    worker.draining = False
    # Requests queued for capacity may now fit on this worker.
    state.admission.kick_all()
    return web.json_response(worker_view(worker, time.monotonic()))


async def reload_config(request: web.Request) -> web.Response:
    state = _admin_state(request)
    problems = await state.reload()
    if problems:
        raise InvalidRequest(
            "the new config was refused, the running one is kept: "
            + "; ".join(f"{path}: {message}" for path, message in problems),
            code="invalid_config",
        )
    return web.json_response(
        {
            "reloaded": True,
            "pools": list(state.registry.pools),
            "workers": sum(1 for _ in state.registry.workers()),
        }
    )
