"""Every Redis key, stream and TTL the fleet shares: the one place they are defined.

Writers: worker agents (`prefix-worker agent`) and gateway replicas. Readers: gateway replicas.
All names start with the configurable prefix (default `pr:`) so one Redis can host several
fleets. Values are plain strings and numbers so any tool can inspect them with redis-cli.

- `{p}worker:{id}` (hash, agent, heartbeat TTL): url, model, block_size, num_gpu_blocks,
  agent_started_at.
- `{p}workers:{model}` (set, agent, no TTL): ids of workers registered for a model; readers drop
  ids whose `{p}worker:{id}` has expired.
- `{p}load:{id}` (hash, agent, heartbeat TTL): running, waiting, kv_usage, prefix_hits,
  prefix_queries, ts.
- `{p}kv:{model}` (stream, agent, MAXLEN ~KV_STREAM_MAXLEN): one entry per KV event with fields
  worker, op (stored | removed | cleared), hashes (space-separated unsigned 64-bit ints),
  parent, seq.
- `{p}kvsnap:{id}` (set, agent, 10 x heartbeat TTL): block hashes (decimal strings) the worker
  holds now, so a gateway that starts late rebuilds its view, then follows the stream.
- `{p}session:{model}:{session}` (string, gateway, SESSION_TTL_S): the session's worker id.
- `{p}idx:{model}` (stream, gateway, MAXLEN ~IDX_STREAM_MAXLEN): approximate index inserts with
  fields replica, worker, keys (space-separated ints).
- `{p}rl:{tenant}:{limit}` (gateway, Lua script, window TTL): rate-limit state.
- `{p}cache:{tenant}:{digest}` (string, gateway, result-cache TTL): a cached answer.
"""

from __future__ import annotations

DEFAULT_PREFIX = "pr:"
HEARTBEAT_TTL_S = 10
KV_STREAM_MAXLEN = 200_000
IDX_STREAM_MAXLEN = 100_000
SESSION_TTL_S = 3600


class Keys:
    """Builds key names under one prefix."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}worker:{worker_id}"

    def workers(self, model: str) -> str:
        return f"{self.prefix}workers:{model}"

    def load(self, worker_id: str) -> str:
        return f"{self.prefix}load:{worker_id}"

    def kv_stream(self, model: str) -> str:
        return f"{self.prefix}kv:{model}"

    def kv_snapshot(self, worker_id: str) -> str:
        return f"{self.prefix}kvsnap:{worker_id}"

    def session(self, model: str, session: str) -> str:
        return f"{self.prefix}session:{model}:{session}"

    def index_stream(self, model: str) -> str:
        return f"{self.prefix}idx:{model}"

    def rate_limit(self, tenant: str, limit: str) -> str:
        return f"{self.prefix}rl:{tenant}:{limit}"

    def result_cache(self, tenant: str, digest: str) -> str:
        return f"{self.prefix}cache:{tenant}:{digest}"
