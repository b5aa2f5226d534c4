"""`GET /stats`: the seed API's service statistics, plus cost and capacity per pool and worker.

The sums live in `router.stats.Stats` (fed by the edge middleware); this handler adds what only
the running gateway knows: readiness, the current workers of each pool, each pool's prefill rate
(for the prefill time cache hits saved) and its configured price.
"""

from __future__ import annotations

from aiohttp import web

from router.config import HybridPolicy
from router.http.context import GatewayState, state_of
from router.http.ops import BACKEND_TYPE, is_loaded, is_ready
from router.stats import PoolFacts

# Pools whose policy has no prefill rate of its own use the hybrid policy's default estimate.
_DEFAULT_PREFILL_TOKENS_PER_S: float = HybridPolicy.model_fields["prefill_tokens_per_s"].default


def pool_facts(state: GatewayState) -> list[PoolFacts]:
    facts = []
    for name, pool in state.registry.pools.items():
        policy = pool.config.policy
        rate = (
            policy.prefill_tokens_per_s
            if isinstance(policy, HybridPolicy)
            else _DEFAULT_PREFILL_TOKENS_PER_S
        )
        facts.append(
            PoolFacts(
                name=name,
                worker_ids=[w.id for w in pool.workers],
                prefill_tokens_per_s=rate,
                cost_per_gpu_hour=pool.config.cost_per_gpu_hour,
            )
        )
    return facts


async def stats(request: web.Request) -> web.Response:
    state = state_of(request)
    state.auth.require_admin(request.headers)  # fleet-wide figures: admin keys only
    facts = pool_facts(state)
    state.stats.forget_workers(w for f in facts for w in f.worker_ids)
    body = {
        "is_loaded": is_loaded(state),
        "is_ready": is_ready(state),
        "backend_type": BACKEND_TYPE,
        **state.stats.view(facts),
    }
    return web.json_response(body)
