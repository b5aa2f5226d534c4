"""The gateway's own settings and its pools: everything in the routing YAML but routing."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from router.config.base import Strict
from router.config.endpoint import parse_endpoint
from router.config.routing import HybridPolicy, IndexConfig, PolicyConfig, PreciseConfig
from router.config.tls import TlsConfig


class ListenConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)


class TimeoutsConfig(Strict):
    """Per-phase upstream timeouts, in seconds."""

    connect_s: float = Field(2.0, gt=0)
    first_byte_s: float = Field(
        60.0, gt=0, description="streamed requests: from sending to the first event"
    )
    idle_s: float = Field(30.0, gt=0, description="longest gap between two streamed chunks")
    total_s: float = Field(600.0, gt=0)
    keepalive_s: float = Field(
        4.0,
        gt=0,
        description="idle upstream connections are closed after this; keep it below the "
        "workers' own keep-alive timeout (5 s for vLLM) so none is reused as the worker closes it",
    )
    generation_s: float | None = Field(
        None,
        gt=0,
        description="non-streamed requests: from sending to the whole answer (vLLM sends no "
        "header before it is complete, so first_byte_s would cut long answers); "
        "null: total_s alone bounds it",
    )

    @property
    def non_streamed_s(self) -> float:
        return self.generation_s if self.generation_s is not None else self.total_s


class HealthConfig(Strict):
    """Active health checks: `/health` plus the model identity from `/v1/models`."""

    interval_s: float = Field(2.0, gt=0)
    timeout_s: float = Field(1.0, gt=0)
    healthy_threshold: int = Field(1, ge=1)
    unhealthy_threshold: int = Field(2, ge=1)
    check_model: bool = True


class OutlierConfig(Strict):
    """Passive outlier ejection: consecutive failures take a worker out for a growing time."""

    consecutive_failures: int = Field(3, ge=1)
    base_ejection_s: float = Field(5.0, gt=0)
    max_ejection_s: float = Field(300.0, gt=0)
    max_ejected_share: float = Field(
        0.5, ge=0.0, le=1.0, description="never eject more than this share of a pool at once"
    )


class RetryConfig(Strict):
    """Retries before the first byte only, never to a worker already tried."""

    max_attempts: int = Field(3, ge=1, description="first try included")
    budget_share: float = Field(
        0.2, ge=0.0, le=1.0, description="retries in flight at most this share of active requests"
    )
    min_retries_in_flight: int = Field(3, ge=0, description="always allowed, whatever the share")
    backoff_base_s: float = Field(0.005, ge=0)
    backoff_max_s: float = Field(0.1, ge=0)
    retry_on_429: bool = False
    retry_on_first_byte_timeout: bool = Field(
        False,
        description="send a request to another worker when the one that accepted it sent no "
        "first event in first_byte_s (streamed) or no answer in generation_s (non-streamed); "
        "off by default because that worker may still be generating, so a retry doubles the "
        "GPU work and a slow answer becomes three. A migrated stream's continuation is retried "
        "either way: its client already holds half the answer",
    )


class LoadScrapeConfig(Strict):
    """Scraping each worker's `/metrics` for running, waiting, KV usage and capacity."""

    enabled: bool = True
    interval_s: float = Field(1.0, gt=0)
    timeout_s: float = Field(1.0, gt=0)


class RequestLimitsConfig(Strict):
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_json_depth: int = Field(32, ge=2)


class AdmissionConfig(Strict):
    """The pool's capacity and the priority queue in front of it."""

    max_in_flight_per_worker: int = Field(
        256, ge=1, description="capacity = this x routable workers; beyond it requests queue"
    )
    queue_size: int = Field(1024, ge=0, description="when full, the lowest priority is shed")
    queue_timeout_s: float = Field(30.0, gt=0)
    timeout_status: Literal[429, 503] = Field(503, description="status after the queue timeout")


class ResultCacheConfig(Strict):
    """Exact-repeat cache for deterministic requests (temperature 0 or a fixed seed)."""

    enabled: bool = False
    ttl_s: float = Field(300.0, gt=0)
    max_entry_bytes: int = Field(256 * 1024, ge=1024)


class WorkerConfig(Strict):
    url: str
    id: str | None = None
    kv_capacity_blocks: int | None = Field(None, ge=1)
    role: Literal["prefill", "decode", "both"] = Field(
        "both",
        description="in a pool with prefill and decode workers (P/D disaggregation, vLLM's "
        "NixlConnector), what this worker does; both: either, or a whole request",
    )

    @field_validator("url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        parse_endpoint(value)  # raises ValueError in words the operator can act on
        return value.strip().rstrip("/")


class PoolConfig(Strict):
    aliases: list[str] = Field(default_factory=list)
    workers: list[WorkerConfig] = Field(default_factory=list)
    policy: PolicyConfig = Field(default_factory=HybridPolicy)
    index: IndexConfig = Field(default_factory=IndexConfig)
    precise: PreciseConfig | None = Field(
        None, description="route on vLLM's block hashes (hybrid policy, Redis state, agents)"
    )
    max_prompt_tokens: int = Field(131_072, ge=1)
    max_tokens_limit: int = Field(32_768, ge=1)
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    result_cache: ResultCacheConfig = Field(default_factory=ResultCacheConfig)
    tls: TlsConfig = Field(default_factory=TlsConfig)
    migrations: int = Field(
        2,
        ge=0,
        description="times a stream whose worker broke mid-answer may move to another worker "
        "(0: it ends with an error event)",
    )
    migrations_in_flight: int = Field(
        32, ge=1, description="continuations this pool dispatches at once (a mass failure's cap)"
    )
    dynamic_lora: bool = Field(
        False,
        description="load a LoRA adapter no routable worker lists onto one (POST "
        "/v1/load_lora_adapter; vLLM needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)",
    )
    lora_adapters: dict[str, str] = Field(
        default_factory=dict,
        description="adapter name -> path: adapters served before any worker lists them "
        "(for dynamic_lora); listed adapters are discovered from workers' /v1/models",
    )
    pd_min_uncached_tokens: int | None = Field(
        None,
        ge=1,
        description="P/D pools: send a request to one decode worker alone (no prefill step) "
        "when fewer of its prompt tokens than this are uncached there; off by default",
    )
    fallback_pools: list[str] = Field(
        default_factory=list,
        description="pools (by name) to use, in order, when this one has no eligible worker "
        "or is saturated",
    )
    overload_max_tokens: int | None = Field(
        None, ge=1, description="cap max_tokens to this while the pool is saturated"
    )
    cost_per_gpu_hour: float | None = Field(
        None,
        ge=0,
        description="price of one worker for one hour (all its GPUs); `/stats` then reports "
        "the cost per million tokens",
    )

    @property
    def session_ttl_s(self) -> float | None:
        """How long the pool's sticky sessions last (hybrid's setting), if it keeps any."""
        return self.policy.session_ttl_s if isinstance(self.policy, HybridPolicy) else None

    @model_validator(mode="after")
    def _unique_workers(self) -> PoolConfig:
        urls = [w.url for w in self.workers]
        if len(set(urls)) != len(urls):
            raise ValueError("a worker url is listed twice")
        if self.precise is not None and self.policy.name != "hybrid":
            raise ValueError("precise prefix mode needs the hybrid policy")
        return self


class TenantLimits(Strict):
    """Per-key limits; `None` means unlimited."""

    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    concurrent_requests: int | None = Field(None, ge=1)


class ApiKeyConfig(Strict):
    """One API key, stored as its SHA-256 (lowercase hex) or read from an environment variable."""

    tenant: str = Field(min_length=1, max_length=64)
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    env: str | None = Field(None, description="environment variable holding the plain key")
    models: list[str] = Field(default_factory=lambda: ["*"], description='"*" allows every model')
    priority: Literal["high", "normal", "low"] = "normal"
    admin: bool = False
    allow_routing_headers: bool = Field(
        False, description="may steer routing with X-Route-To-Worker / X-Priority headers"
    )
    limits: TenantLimits = Field(default_factory=TenantLimits)
    cache_salt: str | None = Field(
        None,
        min_length=16,
        max_length=512,
        description="a secret added to every request of this key as vLLM's cache_salt (a "
        "client's own salt is appended to it): its prefix cache is shared only with keys of "
        "the same salt, never with other tenants",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ApiKeyConfig:
        if (self.sha256 is None) == (self.env is None):
            raise ValueError("give exactly one of sha256 or env")
        return self


class AuthConfig(Strict):
    enabled: bool = Field(description="auth off must be said explicitly")
    keys: list[ApiKeyConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _keys_when_enabled(self) -> AuthConfig:
        if self.enabled and not self.keys:
            raise ValueError("auth is enabled but no keys are configured")
        return self


class StateConfig(Strict):
    backend: Literal["memory", "redis"] = "memory"
    redis_url: str | None = None
    cluster: bool = Field(
        False,
        description="redis_url names a Redis Cluster (any one node's URL seeds it); keys are "
        "laid out by hash slot (router/state/keys.py)",
    )
    timeout_s: float = Field(
        0.05, gt=0, description="per Redis call; a slow Redis adds at most this"
    )
    local_share: float = Field(
        1.0,
        gt=0,
        le=1.0,
        description="share of each tenant limit one replica enforces when state is not shared "
        "(memory backend, or Redis down); e.g. 0.5 with two replicas",
    )
    key_prefix: str = "pr:"
    discovery_interval_s: float = Field(
        1.0, gt=0, description="how often workers registered by agents are read from Redis"
    )

    @model_validator(mode="after")
    def _redis_needs_url(self) -> StateConfig:
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("state.backend redis needs state.redis_url")
        return self


class MetricsConfig(Strict):
    """Who may read `/metrics`, and what its labels may say."""

    public: bool = Field(
        True, description="serve /metrics without a key (Prometheus scrapes); false: admin key"
    )
    tenant_labels: bool = Field(
        False, description="label per-tenant series with tenant names (else `-`)"
    )


class GatewayConfig(Strict):
    listen: ListenConfig = Field(default_factory=ListenConfig)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    auth: AuthConfig
    state: StateConfig = Field(default_factory=StateConfig)
    limits: RequestLimitsConfig = Field(default_factory=RequestLimitsConfig)
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    load_scrape: LoadScrapeConfig = Field(default_factory=LoadScrapeConfig)
    outlier: OutlierConfig = Field(default_factory=OutlierConfig)
    retries: RetryConfig = Field(default_factory=RetryConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    debug_headers: bool = Field(False, description="add X-Route-* headers to every response")
    drain_timeout_s: float = Field(
        30.0, ge=0, description="on SIGTERM, how long in-flight requests may take to finish"
    )
    pools: dict[str, PoolConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _fallbacks_exist(self) -> GatewayConfig:
        for name, pool in self.pools.items():
            for fallback in pool.fallback_pools:
                if fallback not in self.pools or fallback == name:
                    raise ValueError(
                        f"pool {name!r}: fallback pool {fallback!r} is not another pool"
                    )
        return self

    @model_validator(mode="after")
    def _unique_model_names(self) -> GatewayConfig:
        seen: dict[str, str] = {}
        for model, pool in self.pools.items():
            for name in (model, *pool.aliases):
                if name in seen:
                    raise ValueError(f"model name {name!r} is served by two pools")
                seen[name] = model
        return self
