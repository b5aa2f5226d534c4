"""A real, throwaway Redis Cluster for tests: three masters from the same redis-server binary.

Each node is a `RedisServer` in cluster mode with its own port and working directory (its
`nodes.conf` survives a restart there, so a killed master that starts again rejoins with its
slots). The test assigns the slots itself (a third of 16384 to each master), introduces the
nodes with CLUSTER MEET, and waits until every node reports the cluster ok. No replicas: killing
a master takes its slots away until it returns, the harshest case for the gateway.
"""

from __future__ import annotations

import contextlib
import random
import socket
import time

import redis

from tests.redis_server import RedisServer

SLOTS = 16384
_NODE_TIMEOUT_MS = 1000
_READY_DEADLINE_S = 20.0


class RedisClusterNodes:
    def __init__(self, executable: str, masters: int = 3) -> None:
        options = (
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(_NODE_TIMEOUT_MS),
        )  # fmt: skip
        self.nodes = [
            RedisServer(executable, port=_node_port(), extra_args=options) for _ in range(masters)
        ]

    @property
    def url(self) -> str:
        """Any one node seeds a cluster client: the first."""
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        share = SLOTS // len(self.nodes)
        clients = [redis.Redis(port=node.port) for node in self.nodes]
        try:
            for i, client in enumerate(clients):
                last = SLOTS if i == len(clients) - 1 else (i + 1) * share
                client.cluster("ADDSLOTS", *range(i * share, last))
            for node in self.nodes[1:]:
                clients[0].cluster("MEET", "127.0.0.1", node.port)
        finally:
            for client in clients:
                client.close()
        self.wait_ok()

    def wait_ok(self, nodes: list[RedisServer] | None = None) -> None:
        """Block until each node (of `nodes`, default all) says the cluster is ok and knows
        every master."""
        deadline = time.monotonic() + _READY_DEADLINE_S
        for node in nodes or self.nodes:
            client = redis.Redis(port=node.port)
            try:
                while not _ok(client, len(self.nodes)):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"cluster node {node.port} did not become ok")
                    time.sleep(0.05)
            finally:
                client.close()

    def node_of(self, key: str) -> RedisServer:
        """The master serving `key`'s slot."""
        slot = redis.Redis(port=self.nodes[0].port).cluster("keyslot", key)
        return self.nodes[min(int(slot) // (SLOTS // len(self.nodes)), len(self.nodes) - 1)]

    def keys(self, pattern: str = "*") -> set[str]:
        """Every key of the cluster matching `pattern`, from every master."""
        found: set[str] = set()
        for node in self.nodes:
            client = redis.Redis(port=node.port, decode_responses=True)
            try:
                found.update(client.scan_iter(match=pattern, count=1000))
            finally:
                client.close()
        return found

    def close(self) -> None:
        for node in self.nodes:
            node.close()


def _node_port() -> int:
    """A free port whose cluster bus port (port + 10000, Redis's rule) is free too, both below
    the kernel's ephemeral range (from 32768), where outgoing connections could take them."""
    while True:
        port = random.randrange(10000, 22000)
        try:
            with contextlib.ExitStack() as stack:
                for candidate in (port, port + 10000):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port


def _ok(client: redis.Redis, masters: int) -> bool:
    try:
        info = client.cluster("info")
    except redis.RedisError:
        return False
    return bool(
        info.get("cluster_state") == "ok"
        and int(info.get("cluster_known_nodes", 0)) == masters
        and int(info.get("cluster_slots_ok", 0)) == SLOTS
    )
