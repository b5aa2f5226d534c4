"""A pool: the workers serving one model, its routing policy, and who can take a request now.

A pool is a domain value: the policy and keyer it carries are built by routing and handed in
(see `PoolRouting`), so this package imports nothing of the gateway but its config schema.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Protocol

from router.config import PoolConfig, PreciseConfig, client_context
from router.domain.calibration import TokenCalibration
from router.domain.policy import Policy, PromptKeyer
from router.domain.worker import Health, Role, Worker


class PoolRouting(Protocol):
    """What builds a pool's routing parts (routing/factory.py); injected into the registry."""

    def policy(self, pool: str, config: PoolConfig, calibration: TokenCalibration) -> Policy:
        """A fresh policy for the pool (its own index and session table)."""
        ...

    def keyer(self, config: PreciseConfig) -> PromptKeyer:
        """The tokenizer and block hashing of a pool in precise mode."""
        ...

    def decode_policy(self) -> Policy:
        """The load-aware pick of a P/D pool's decode step."""
        ...


@dataclass(eq=False)
class Pool:
    name: str
    config: PoolConfig
    policy: Policy
    workers: list[Worker] = field(default_factory=list)
    keyer: PromptKeyer | None = None
    """Tokenizer and block hashing of a pool in precise mode."""
    calibration: TokenCalibration = field(default_factory=TokenCalibration)
    """Characters per token of this pool's traffic, learned from workers' usage; it outlives
    reloads, as the traffic does."""
    decode_policy: Policy | None = None
    """The decode step's pick, for a P/D pool (see `disaggregated`)."""
    disaggregated: bool = False
    """Prefill and decode workers both present: requests go prefill, then decode (kept by
    `roles_changed`, not computed per request)."""

    _tls: ssl.SSLContext | None = field(default=None, init=False, repr=False)

    def tls_context(self) -> ssl.SSLContext:
        """The pool's client TLS context, built on first use from its config (a pool, and so
        a reload, builds its own: a rotated CA file is read again)."""
        if self._tls is None:
            self._tls = client_context(self.config.tls)
        return self._tls

    def roles_changed(self) -> None:
        roles = {w.role for w in self.workers}
        self.disaggregated = "prefill" in roles and "decode" in roles

    def candidates(self, adapter: str | None = None, role: Role | None = None) -> list[Worker]:
        """Who may take a request now; for a LoRA `adapter`, only workers that list it; for
        a P/D step, workers of that `role` or `both` (a whole request: not prefill-only)."""
        workers = self.workers
        if adapter is not None:
            workers = [w for w in workers if adapter in w.adapters]
        if self.disaggregated:
            refused = "decode" if role == "prefill" else "prefill"
            workers = [w for w in workers if w.role != refused]
        routable = [w for w in workers if w.routable]
        if routable:
            return routable
        # Panic mode: every healthy worker is ejected; routing to them beats refusing all.
        return [w for w in workers if w.health is Health.HEALTHY and not w.draining]

    def has_healthy_worker(self) -> bool:
        return any(w.routable for w in self.workers)
