"""Pools and their workers: which model names a pool serves, and who can serve it now.

The registry is the single owner of Worker objects. Static workers come from the YAML;
discovered workers (agents registering through Redis) are added and removed at run time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from router.config import GatewayConfig
from router.domain.calibration import TokenCalibration
from router.domain.pool import Pool, PoolRouting
from router.domain.worker import Worker
from router.errors import ModelNotFound


class Registry:
    def __init__(self, config: GatewayConfig, routing: PoolRouting) -> None:
        self._routing = routing
        self._pools: dict[str, Pool] = {}
        self._by_model: dict[str, Pool] = {}
        self._workers: dict[str, Worker] = {}
        self.on_remove: list[Callable[[Worker], None]] = []
        """Called once for every worker that leaves (reload or lapsed registration)."""
        self.apply(config)

    def apply(self, config: GatewayConfig) -> list[Worker]:
        """Take a new config (at start, or on reload) and swap to it in one step.

        Workers that stay (same pool and URL) keep their object: health, load, ejections and
        in-flight counts carry over. A pool whose policy and index settings did not change keeps
        its policy, so its prefix index stays warm. Requests in flight hold the old objects and
        finish untouched. Returns the workers that left.
        """
        pools: dict[str, Pool] = {}
        by_model: dict[str, Pool] = {}
        workers: dict[str, Worker] = {}
        kept_policy: set[str] = set()
        for name, pool_config in config.pools.items():
            old = self._pools.get(name)
            calibration = old.calibration if old is not None else TokenCalibration()
            if (
                old is not None
                and old.config.policy == pool_config.policy
                and old.config.index == pool_config.index
                and old.config.precise == pool_config.precise
            ):
                policy = old.policy
                kept_policy.add(name)
            else:
                policy = self._routing.policy(name, pool_config, calibration)
            keyer = None
            if pool_config.precise is not None:
                same = old is not None and old.config.precise == pool_config.precise
                keyer = old.keyer if same and old is not None else None
                keyer = keyer or self._routing.keyer(pool_config.precise)
            pool = Pool(
                name=name, config=pool_config, policy=policy, keyer=keyer, calibration=calibration
            )
            pool.decode_policy = (
                old.decode_policy if old is not None else None
            ) or self._routing.decode_policy()
            pools[name] = pool
            for model in (name, *pool_config.aliases):
                by_model[model] = pool
            previous = {w.url: w for w in old.workers} if old is not None else {}
            for i, wc in enumerate(pool_config.workers):
                worker = previous.get(wc.url)
                if worker is None:
                    worker = Worker(id=wc.id or f"{name}/{i}", url=wc.url, pool=name)
                worker.kv_capacity_blocks = wc.kv_capacity_blocks
                worker.role = wc.role
                worker.ssl = pool.tls_context() if worker.endpoint.tls else None
                if worker.id in workers:
                    worker.id = f"{worker.id}#{i}"
                workers[worker.id] = worker
                pool.workers.append(worker)
        for worker in self._workers.values():
            # Discovered workers are not in the YAML: they stay while their pool does.
            if worker.discovered and worker.pool in pools and worker.id not in workers:
                workers[worker.id] = worker
                pools[worker.pool].workers.append(worker)
                worker.ssl = pools[worker.pool].tls_context() if worker.endpoint.tls else None
        for pool in pools.values():
            pool.roles_changed()
        gone = [w for w in self._workers.values() if workers.get(w.id) is not w]
        for worker in gone:
            if worker.pool in kept_policy:
                pools[worker.pool].policy.forget_worker(worker)
        kept_keyers = {id(p.keyer) for p in pools.values()}
        for old_pool in self._pools.values():
            if old_pool.keyer is not None and id(old_pool.keyer) not in kept_keyers:
                old_pool.keyer.close()  # its helper process has nothing left to key
        self._pools, self._by_model, self._workers = pools, by_model, workers
        for worker in gone:
            self._left(worker)
        return gone

    @property
    def pools(self) -> dict[str, Pool]:
        return self._pools

    def pool_for(self, model: object, visible: Callable[[str], bool] = lambda _: True) -> Pool:
        """The pool serving `model` (see `resolve`)."""
        return self.resolve(model, visible)[0]

    def resolve(
        self, model: object, visible: Callable[[str], bool] = lambda _: True
    ) -> tuple[Pool, str | None]:
        """The pool serving `model`, and the LoRA adapter it names (None for a pool's own
        name or alias): an adapter belongs to the pool whose workers list it, or whose YAML
        names it. The error lists only the models of pools `visible` (the caller's
        allow-list: a key learns nothing of models it may not use)."""
        pool = self._by_model.get(model) if isinstance(model, str) else None
        if pool is None and isinstance(model, str):
            pool = self._adapter_pool(model)
            if pool is not None:
                return pool, model
        if pool is None:
            names = sorted(m for m, p in self._by_model.items() if visible(p.name))
            raise ModelNotFound(
                f"The model `{model}` does not exist. Available models: "
                + (", ".join(names) or "none for this key"),
                param="model",
            )
        return pool, None

    def _adapter_pool(self, adapter: str) -> Pool | None:
        for pool in self._pools.values():
            if adapter in pool.config.lora_adapters or any(
                adapter in w.adapters for w in pool.workers
            ):
                return pool
        return None

    def adapters(self, pool: Pool) -> dict[str, str]:
        """The adapters a pool serves: those its YAML names and those its workers list."""
        found = dict(pool.config.lora_adapters)
        for worker in pool.workers:
            found.update(worker.adapters)
        return found

    def add_worker(self, worker: Worker) -> None:
        if worker.id in self._workers:
            return
        self._workers[worker.id] = worker
        pool = self._pools[worker.pool]
        pool.workers.append(worker)
        pool.roles_changed()
        worker.ssl = pool.tls_context() if worker.endpoint.tls else None

    def remove_worker(self, worker_id: str) -> None:
        """Stop routing to a worker; requests already on it finish on their own."""
        worker = self._workers.pop(worker_id, None)
        if worker is None:
            return
        pool = self._pools[worker.pool]
        pool.workers.remove(worker)
        pool.roles_changed()
        pool.policy.forget_worker(worker)
        self._left(worker)

    def _left(self, worker: Worker) -> None:
        for callback in self.on_remove:
            callback(worker)

    def worker(self, worker_id: str) -> Worker | None:
        return self._workers.get(worker_id)

    def workers(self) -> Iterator[Worker]:
        return iter(list(self._workers.values()))

    def close(self) -> None:
        """Stop what the pools run beside the gateway (precise keyers' helper processes)."""
        for pool in self._pools.values():
            if pool.keyer is not None:
                pool.keyer.close()

    def models(self) -> list[str]:
        return list(self._pools)
