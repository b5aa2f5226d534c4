"""Every pydantic model of the routing YAML, and how to load and validate it.

Components receive their typed sub-config; nothing outside this package parses configuration.
All models forbid unknown fields so a typo in the YAML is an error, not a silent default. The
schema is split by subject (`routing`: policies and indexes; `gateway`: everything else;
`loading`: YAML to a validated config) and re-exported here, so the YAML's whole schema, and
the generated `docs/configuration.md`, still have one source.
"""

from __future__ import annotations

from router.config.base import (
    Strict,
)
from router.config.endpoint import (
    Endpoint,
    parse_endpoint,
)
from router.config.gateway import (
    AdmissionConfig,
    ApiKeyConfig,
    AuthConfig,
    GatewayConfig,
    HealthConfig,
    ListenConfig,
    LoadScrapeConfig,
    MetricsConfig,
    OutlierConfig,
    PoolConfig,
    RequestLimitsConfig,
    ResultCacheConfig,
    RetryConfig,
    StateConfig,
    TenantLimits,
    TimeoutsConfig,
    WorkerConfig,
)
from router.config.loading import (
    ConfigError,
    load_config,
    parse_config,
    quick_config,
)
from router.config.routing import (
    POLICY_NAMES,
    ConsistentHashPolicy,
    HybridPolicy,
    IndexConfig,
    LeastLoadPolicy,
    PolicyConfig,
    PreciseConfig,
    PrefixPolicy,
    RoundRobinPolicy,
)
from router.config.tls import (
    TlsConfig,
    client_context,
)

__all__ = [
    "POLICY_NAMES",
    "AdmissionConfig",
    "ApiKeyConfig",
    "AuthConfig",
    "ConfigError",
    "ConsistentHashPolicy",
    "Endpoint",
    "GatewayConfig",
    "HealthConfig",
    "HybridPolicy",
    "IndexConfig",
    "LeastLoadPolicy",
    "ListenConfig",
    "LoadScrapeConfig",
    "MetricsConfig",
    "OutlierConfig",
    "PolicyConfig",
    "PoolConfig",
    "PreciseConfig",
    "PrefixPolicy",
    "RequestLimitsConfig",
    "ResultCacheConfig",
    "RetryConfig",
    "RoundRobinPolicy",
    "StateConfig",
    "Strict",
    "TenantLimits",
    "TimeoutsConfig",
    "TlsConfig",
    "WorkerConfig",
    "client_context",
    "load_config",
    "parse_config",
    "parse_endpoint",
    "quick_config",
]
