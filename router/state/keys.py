"""Every Redis key, stream and TTL the fleet shares: the one place they are defined.

Writers: worker agents (`prefix-worker agent`) and gateway replicas. Readers: gateway replicas.
All names start with the configurable prefix (default `pr:`) so one Redis can host several
fleets. Values are plain strings and numbers so any tool can inspect them with redis-cli.

The layout runs unchanged on one Redis and on Redis Cluster (`state.cluster`): every Lua script
and every MULTI/EXEC touches keys of one hash slot (a single key, or keys sharing a `{...}` hash
tag), and every other multi-key operation is a pipeline of single-key commands.

- `{p}worker:{id}` (hash, agent, heartbeat TTL, rewritten every interval): url (base URL, no
  `/v1`), model, block_size and num_gpu_blocks (from `vllm:cache_config_info`; absent until the
  worker reported them), agent_started_at (unix seconds).
- `{p}workers:{model}` (set, agent, no TTL): ids of workers registered for a model; gateways
  remove ids whose `{p}worker:{id}` has expired (the agent died), and a live agent adds its id
  back with every heartbeat.
- `{p}load:{id}` (hash, agent, heartbeat TTL): running, waiting (ints), kv_usage (0-1),
  prefix_hits, prefix_queries (vLLM's token counters, monotonic until the worker restarts),
  lora_running, lora_waiting (comma-separated adapter names, from `vllm:lora_requests_info`),
  max_lora (empty without LoRA), ts (unix seconds of the scrape).
- `{p}kv:{<model>:<shard>}` (stream, agent, MAXLEN ~KV_STREAM_MAXLEN each): one of a pool's
  KV_STREAM_SHARDS streams; a worker writes to shard `crc32(worker id) % KV_STREAM_SHARDS`, so no
  single key carries a whole large fleet and, on Redis Cluster, the shards spread over the
  masters (the braces are the hash tag). Entries are the changes of each worker's block
  set, with fields worker, op (stored | removed | cleared), hashes (space-separated unsigned
  64-bit ints, vLLM's event ints; empty for cleared), parent (int of the block before the first
  stored one, empty at position 0 and for other ops), seq (vLLM's batch seq, empty for entries
  the agent makes itself). Applying a worker's entries in order as set operations (add, discard,
  clear) yields its snapshot. Consecutive removals of one batch share one entry. Only GPU-tier
  events count (offload tiers are skipped). A removal means "may be gone" (vLLM does not dedupe
  blocks). Whenever the agent loses track (its start, a gap replay cannot fill, a worker
  restart) it writes `cleared` and the entries that follow rebuild the set; after a Redis outage
  it writes `cleared` then the whole set as `stored` entries (parent and seq empty, at most
  SNAPSHOT_CHUNK hashes each). So a follower that read every entry needs no snapshot; one that
  fell behind the stream's trimming re-reads the snapshot.
- `{p}kv:{<model>:<shard>}:snap:{id}` (set, agent, 10 x heartbeat TTL): block hashes (decimal
  strings) the worker holds now, so a gateway that starts late rebuilds its view, then follows
  the streams (read each stream's last id first, then the snapshots, then XREAD from those ids;
  replaying entries the snapshot already reflects is harmless, since they are set operations).
  It shares its stream's hash tag: the agent updates both in one MULTI/EXEC, which Redis
  Cluster allows only within one hash slot.
- `{p}session:{model}:{tenant}:{session}` (string, gateway, the pool's `session_ttl_s`): the
  session's worker id. Scoped by tenant: two tenants' equal session ids are two sessions.
- `{p}idx:{<model>:<shard>}` (stream, gateway, MAXLEN ~IDX_STREAM_MAXLEN each): approximate
  index inserts with fields replica, worker, keys (space-separated ints) and, for a routing
  decision, prefill (the tokens it sends the worker to compute), sharded by worker like the KV
  streams.
- `{p}rl:{tenant}:{limit}` (gateway, Lua script, window TTL): rate-limit state.
- `{p}cache:{tenant}:{digest}` (string, gateway, result-cache TTL): a cached answer.
"""

from __future__ import annotations

import zlib

DEFAULT_PREFIX = "pr:"
HEARTBEAT_TTL_S = 10
KV_STREAM_MAXLEN = 25_000
"""Entries kept per KV-event stream shard (200,000 for a pool's 8 shards together)."""
KV_SNAPSHOT_TTL_FACTOR = 10  # kvsnap TTL = factor x heartbeat TTL
SNAPSHOT_CHUNK = 1000  # hashes per SADD / stream entry when (re)writing a whole snapshot
IDX_STREAM_MAXLEN = 12_500
"""Entries kept per index stream shard (100,000 for a pool)."""
SESSION_TTL_S = 3600
KV_STREAM_SHARDS = 8
"""Streams per pool for KV events (and for index inserts). Agents and gateways must agree on
it, so it is part of the key layout, not a setting."""


def shard_of(worker_id: str) -> int:
    """The stream shard a worker writes to: stable across processes and restarts."""
    return zlib.crc32(worker_id.encode()) % KV_STREAM_SHARDS


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

    def _shard(self, kind: str, model: str, shard: int) -> str:
        """One shard of a pool's sharded stream; the braces make `<model>:<shard>` the hash tag."""
        return f"{self.prefix}{kind}:{{{model}:{shard}}}"

    def kv_stream(self, model: str, shard: int) -> str:
        return self._shard("kv", model, shard)

    def kv_streams(self, model: str) -> list[str]:
        """Every KV-event stream of a pool, in shard order."""
        return [self.kv_stream(model, shard) for shard in range(KV_STREAM_SHARDS)]

    def kv_stream_of(self, model: str, worker_id: str) -> str:
        return self.kv_stream(model, shard_of(worker_id))

    def kv_snapshot(self, model: str, worker_id: str) -> str:
        return f"{self.kv_stream_of(model, worker_id)}:snap:{worker_id}"

    def session(self, model: str, tenant: str, session: str) -> str:
        return f"{self.prefix}session:{model}:{tenant}:{session}"

    def index_stream(self, model: str, shard: int) -> str:
        return self._shard("idx", model, shard)

    def index_streams(self, model: str) -> list[str]:
        return [self.index_stream(model, shard) for shard in range(KV_STREAM_SHARDS)]

    def index_stream_of(self, model: str, worker_id: str) -> str:
        return self.index_stream(model, shard_of(worker_id))

    def rate_limit(self, tenant: str, limit: str) -> str:
        return f"{self.prefix}rl:{tenant}:{limit}"

    def result_cache(self, tenant: str, digest: str) -> str:
        return f"{self.prefix}cache:{tenant}:{digest}"
