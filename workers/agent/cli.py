"""The ``prefix-worker agent`` subcommand: flags to ``AgentConfig``, then run the agent.

Kept beside the agent so ``workers/cli.py`` only mounts it: the flags mirror the config fields.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

from pydantic import ValidationError

from router.state.keys import DEFAULT_PREFIX, HEARTBEAT_TTL_S
from workers.agent.config import AgentConfig


def add_agent_parser(commands: Any) -> None:
    """Add ``agent`` to the ``prefix-worker`` subcommands (``commands`` from add_subparsers)."""
    agent = commands.add_parser(
        "agent", help="mirror a vLLM worker's registration, load and KV events into Redis"
    )
    agent.add_argument("--vllm-url", required=True, help="the worker's base URL (no /v1)")
    agent.add_argument("--kv-events", required=True, help="the worker's KV events endpoint")
    agent.add_argument("--replay", default=None, help="the worker's KV events replay endpoint")
    agent.add_argument("--topic", default="", help="KV events topic (vLLM's kv events topic)")
    agent.add_argument("--redis", required=True, help="redis://host:port/db")
    agent.add_argument(
        "--redis-cluster", action="store_true", help="--redis names one node of a Redis Cluster"
    )
    agent.add_argument("--worker-id", required=True)
    agent.add_argument("--model", default=None, help="served model; from /v1/models if omitted")
    agent.add_argument("--advertise-url", default=None, help="URL gateways use (default vllm-url)")
    agent.add_argument("--interval-s", type=float, default=1.0)
    agent.add_argument("--heartbeat-ttl-s", type=int, default=HEARTBEAT_TTL_S)
    agent.add_argument("--key-prefix", default=DEFAULT_PREFIX)


def run_agent_command(args: argparse.Namespace) -> int:
    try:
        config = AgentConfig(
            vllm_url=args.vllm_url,
            kv_events_endpoint=args.kv_events,
            replay_endpoint=args.replay,
            topic=args.topic,
            redis_url=args.redis,
            redis_cluster=args.redis_cluster,
            worker_id=args.worker_id,
            model=args.model,
            advertise_url=args.advertise_url,
            interval_s=args.interval_s,
            heartbeat_ttl_s=args.heartbeat_ttl_s,
            key_prefix=args.key_prefix,
        )
    except ValidationError as exc:
        print(f"prefix-worker agent: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    from workers.agent.agent import run_agent  # aiohttp, redis and zmq only when running

    with contextlib.suppress(KeyboardInterrupt):
        run_agent(config)
    return 0
