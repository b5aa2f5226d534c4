"""API keys: who is calling, which models they may use, their priority and limits.

Keys are never stored in plain text: the YAML holds each key's SHA-256 (or names an environment
variable, hashed at start). A presented key is hashed and looked up in a dict, so there is no
string-prefix comparison and no timing signal beyond the hash itself. Plain keys are never
logged; a tenant's name is what logs and metrics see.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from router.config import ApiKeyConfig, AuthConfig, TenantLimits
from router.errors import AuthenticationFailed, PermissionDenied

log = logging.getLogger("prefix_router.auth")

KEY_PREFIX = "pr-"


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    models: frozenset[str]
    priority: str
    admin: bool
    allow_routing_headers: bool
    limits: TenantLimits
    cache_salt: str | None = None
    """Added to every request's `cache_salt` (a secret: never logged)."""

    def may_use(self, model: str) -> bool:
        return "*" in self.models or model in self.models


ANONYMOUS = Tenant(
    name="anonymous",
    models=frozenset({"*"}),
    priority="normal",
    admin=True,
    allow_routing_headers=False,
    limits=TenantLimits(),
)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _tenant(entry: ApiKeyConfig) -> Tenant:
    return Tenant(
        name=entry.tenant,
        models=frozenset(entry.models),
        priority=entry.priority,
        admin=entry.admin,
        allow_routing_headers=entry.allow_routing_headers,
        limits=entry.limits,
        cache_salt=entry.cache_salt,
    )


class Authenticator:
    def __init__(self, config: AuthConfig) -> None:
        self.enabled = config.enabled
        self._by_hash: dict[str, Tenant] = {}
        for entry in config.keys:
            digest = entry.sha256
            if entry.env is not None:
                plain = os.environ.get(entry.env)
                if not plain:
                    log.warning(
                        "key of tenant %s: environment variable %s is not set",
                        entry.tenant,
                        entry.env,
                    )
                    continue
                digest = hash_key(plain)
            assert digest is not None
            self._by_hash[digest] = _tenant(entry)

    def authenticate(self, headers: Mapping[str, str]) -> Tenant:
        """The tenant of the API key in the request's headers."""
        if not self.enabled:
            return ANONYMOUS
        key = _presented_key(headers)
        if not key:
            raise AuthenticationFailed(
                "missing API key: send `Authorization: Bearer KEY` or `x-api-key: KEY`"
            )
        tenant = self._by_hash.get(hash_key(key))
        if tenant is None:
            raise AuthenticationFailed("invalid API key")
        return tenant

    def require_admin(self, headers: Mapping[str, str]) -> Tenant:
        tenant = self.authenticate(headers)
        if not tenant.admin:
            raise PermissionDenied("this endpoint needs an admin key", code="admin_required")
        return tenant


def check_model(tenant: Tenant, model: str) -> None:
    if not tenant.may_use(model):
        raise PermissionDenied(
            f"your key may not use model `{model}`", param="model", code="model_not_allowed"
        )


def _presented_key(headers: Mapping[str, str]) -> str | None:
    header = headers.get("Authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None
    key = headers.get("x-api-key")
    return key.strip() if key else None
