"""Build a pool's routing policy from its typed config: the one place policy names map to classes.

Each pool gets its own policy instance (and so its own prefix index and session table), built
once at start or config reload; `rng` is injected so tests and benchmarks are reproducible.
"""

from __future__ import annotations

import random

from router.config import (
    ConsistentHashPolicy,
    HybridPolicy,
    IndexConfig,
    LeastLoadPolicy,
    PolicyConfig,
    PoolConfig,
    PreciseConfig,
    PrefixPolicy,
    RoundRobinPolicy,
)
from router.domain.calibration import TokenCalibration
from router.domain.policy import Policy, PromptKeyer
from router.routing.consistent_hash import ConsistentHash
from router.routing.hybrid import HybridCost
from router.routing.least_load import DecodeLoad, LeastLoad
from router.routing.offloaded_key import OffloadedKeyer
from router.routing.precise_index import PreciseIndex
from router.routing.prefix import PrefixAffinity
from router.routing.round_robin import RoundRobin


def build_policy(
    pool_name: str,
    config: PolicyConfig,
    index_config: IndexConfig,
    rng: random.Random | None = None,
    precise: PreciseConfig | None = None,
    calibration: TokenCalibration | None = None,
) -> Policy:
    """A fresh policy for pool `pool_name` (the name only appears in errors); `precise` gives a
    hybrid policy its precise index."""
    rng = rng or random.Random()
    calibration = calibration or TokenCalibration()
    if isinstance(config, RoundRobinPolicy):
        return RoundRobin()
    if isinstance(config, LeastLoadPolicy):
        return LeastLoad(rng)
    if isinstance(config, ConsistentHashPolicy):
        return ConsistentHash(config, index_config)
    if isinstance(config, PrefixPolicy):
        return PrefixAffinity(config, index_config, rng, calibration)
    if isinstance(config, HybridPolicy):
        precise_index = None
        if precise is not None:
            precise_index = PreciseIndex(
                precise.block_size, precise.speculative_ttl_s, precise.default_capacity_blocks
            )
        return HybridCost(config, index_config, rng, precise_index, calibration)
    raise ValueError(f"pool {pool_name!r}: unknown policy {config!r}")


class PoolRoutingFactory:
    """Builds each pool's routing parts for the registry (`domain.pool.PoolRouting`)."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def policy(self, pool: str, config: PoolConfig, calibration: TokenCalibration) -> Policy:
        return build_policy(
            pool, config.policy, config.index, self._rng, config.precise, calibration
        )

    def keyer(self, config: PreciseConfig) -> PromptKeyer:
        return OffloadedKeyer(config)

    def decode_policy(self) -> Policy:
        return DecodeLoad(self._rng)
