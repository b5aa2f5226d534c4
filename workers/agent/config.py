"""Configuration of the worker agent that mirrors one vLLM worker's state into Redis.

One pydantic model: which worker to watch (its HTTP base URL and its KV event endpoints), where to
write (Redis URL and key prefix, see ``router.state.keys``), under which id and model, and the
cadence and timeouts of the loops. Every wait the agent makes has a timeout here, so nothing in it
waits forever on a worker or on Redis.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from router.state.keys import DEFAULT_PREFIX, HEARTBEAT_TTL_S, KV_STREAM_MAXLEN


class AgentConfig(BaseModel):
    """Everything one agent needs; immutable once built."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vllm_url: str = Field(min_length=1, description="the worker's base URL, e.g. http://h:8000")
    kv_events_endpoint: str = Field(
        min_length=1, description="the worker's PUB endpoint; bound here if it has '*'"
    )
    replay_endpoint: str | None = Field(default=None, description="the worker's ROUTER endpoint")
    topic: str = Field(default="", description="subscription prefix (vLLM's kv events topic)")
    redis_url: str = Field(min_length=1)
    redis_cluster: bool = Field(
        default=False, description="redis_url names a Redis Cluster (any one node seeds it)"
    )
    worker_id: str = Field(min_length=1, pattern=r"^[^\s:]+$")
    model: str | None = Field(default=None, description="taken from /v1/models when None")
    advertise_url: str | None = Field(
        default=None, description="URL gateways should use; vllm_url when None"
    )
    key_prefix: str = DEFAULT_PREFIX

    interval_s: float = Field(default=1.0, gt=0, description="metrics scrape and heartbeat")
    heartbeat_ttl_s: int = Field(default=HEARTBEAT_TTL_S, ge=1)
    kv_stream_maxlen: int = Field(default=KV_STREAM_MAXLEN, ge=1)

    http_timeout_s: float = Field(default=2.0, gt=0)
    redis_timeout_s: float = Field(default=1.0, gt=0)
    replay_timeout_s: float = Field(default=2.0, gt=0, description="max silence within a replay")
    replay_probe_s: float = Field(
        default=2.0, gt=0, description="ask the replay buffer after this long without events"
    )
    redis_retry_max_s: float = Field(default=5.0, gt=0, description="backoff cap during outages")

    @property
    def public_url(self) -> str:
        return (self.advertise_url or self.vllm_url).rstrip("/")
