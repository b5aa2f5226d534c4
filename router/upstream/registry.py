"""Pools and their workers: which model names a pool serves, and who can serve it now.

The registry is the single owner of Worker objects. Static workers come from the YAML;
discovered workers (agents registering through Redis) are added and removed at run time.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from router.config import GatewayConfig, PoolConfig
from router.errors import ModelNotFound
from router.routing.factory import build_policy
from router.routing.policy import Policy
from router.upstream.worker import Health, Worker


@dataclass(eq=False)
class Pool:
    name: str
    config: PoolConfig
    policy: Policy
    workers: list[Worker] = field(default_factory=list)

    def candidates(self) -> list[Worker]:
        routable = [w for w in self.workers if w.routable]
        if routable:
            return routable
        # Panic mode: every healthy worker is ejected; routing to them beats refusing all.
        return [w for w in self.workers if w.health is Health.HEALTHY and not w.draining]

    def has_healthy_worker(self) -> bool:
        return any(w.routable for w in self.workers)


class Registry:
    def __init__(self, config: GatewayConfig, rng: random.Random | None = None) -> None:
        self._pools: dict[str, Pool] = {}
        self._by_model: dict[str, Pool] = {}
        self._workers: dict[str, Worker] = {}
        rng = rng or random.Random()
        for name, pool_config in config.pools.items():
            policy = build_policy(name, pool_config.policy, pool_config.index, rng=rng)
            pool = Pool(name=name, config=pool_config, policy=policy)
            self._pools[name] = pool
            for model in (name, *pool_config.aliases):
                self._by_model[model] = pool
            for i, wc in enumerate(pool_config.workers):
                worker_id = wc.id or f"{name}/{i}"
                self.add_worker(
                    Worker(
                        id=worker_id,
                        url=wc.url,
                        pool=name,
                        kv_capacity_blocks=wc.kv_capacity_blocks,
                    )
                )

    @property
    def pools(self) -> dict[str, Pool]:
        return self._pools

    def pool_for(self, model: object) -> Pool:
        pool = self._by_model.get(model) if isinstance(model, str) else None
        if pool is None:
            raise ModelNotFound(
                f"The model `{model}` does not exist. Available models: "
                + ", ".join(sorted(self._by_model)),
                param="model",
            )
        return pool

    def add_worker(self, worker: Worker) -> None:
        if worker.id in self._workers:
            return
        self._workers[worker.id] = worker
        self._pools[worker.pool].workers.append(worker)

    def remove_worker(self, worker_id: str) -> None:
        """Stop routing to a worker; requests already on it finish on their own."""
        worker = self._workers.pop(worker_id, None)
        if worker is None:
            return
        pool = self._pools[worker.pool]
        pool.workers.remove(worker)
        pool.policy.forget_worker(worker)

    def worker(self, worker_id: str) -> Worker | None:
        return self._workers.get(worker_id)

    def workers(self) -> Iterator[Worker]:
        return iter(list(self._workers.values()))

    def models(self) -> list[str]:
        return list(self._pools)
