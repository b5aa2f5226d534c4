"""Keep-alive connection pools for the relay, one per worker base URL (`http1.Connection`s).

A connection idle longer than `keepalive_s` is closed rather than reused (below the worker's own
keep-alive timeout, so a request is never written just as the worker closes the connection); a
reload that changes a worker's TLS context drops the connections made with the old one.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field

from router.config.endpoint import Endpoint, parse_endpoint
from router.upstream.http1 import Connection


@dataclass(eq=False)
class HostPool:
    endpoint: Endpoint
    ssl: ssl.SSLContext | None = None
    idle: list[Connection] = field(default_factory=list)


class UpstreamClient:
    """Keep-alive connection pools, one per worker base URL."""

    def __init__(self, max_idle_per_host: int = 256, keepalive_s: float = 4.0) -> None:
        self._pools: dict[str, HostPool] = {}
        self._max_idle = max_idle_per_host
        self.keepalive_s = keepalive_s
        """Idle connections older than this are closed, not reused: below the worker's own
        keep-alive timeout (uvicorn's, so vLLM's, is 5 s), a connection is never reused at the
        moment the worker closes it, which would lose a request already written."""
        self._closed = False

    def _pool(
        self, base_url: str, endpoint: Endpoint | None, context: ssl.SSLContext | None
    ) -> HostPool:
        pool = self._pools.get(base_url)
        if pool is None:
            pool = HostPool(endpoint or parse_endpoint(base_url), context)
            self._pools[base_url] = pool
        elif context is not pool.ssl:
            # A reload built a new TLS context: connections made with the old one go.
            for conn in pool.idle:
                conn.close()
            pool.idle.clear()
            pool.ssl = context
        return pool

    async def connect(
        self,
        base_url: str,
        timeout_s: float,
        fresh: bool = False,
        *,
        endpoint: Endpoint | None = None,
        context: ssl.SSLContext | None = None,
    ) -> Connection:
        """A ready connection: an idle pooled one if any (unless `fresh`), else a new one,
        over TLS when the worker's URL is https:// (`context` from its pool's config)."""
        pool = self._pool(base_url, endpoint, context)
        loop = asyncio.get_running_loop()
        oldest = loop.time() - self.keepalive_s
        while pool.idle and not fresh:
            conn = pool.idle.pop()
            if conn.idle_since < oldest:
                # The last one pushed is the newest: every other idle one is older still.
                for stale in (conn, *pool.idle):
                    stale.close()
                pool.idle.clear()
                break
            if conn.reusable and conn.transport is not None and not conn.transport.is_closing():
                return conn
            conn.close()  # bytes arrived while it sat idle, or it closed: out of step
        target = pool.endpoint
        tls = pool.ssl if target.tls else None
        if target.tls and tls is None:
            tls = ssl.create_default_context()
        async with asyncio.timeout(timeout_s):
            _, protocol = await loop.create_connection(
                lambda: Connection(loop),
                target.host,
                target.port,
                ssl=tls,
                server_hostname=target.host if tls is not None else None,
            )
        return protocol

    def release(self, base_url: str, conn: Connection) -> None:
        """Return a connection after its response was read to the end; close it otherwise."""
        pool = self._pools.get(base_url)
        if (
            self._closed
            or pool is None
            or not conn.reusable
            or not conn.finished
            or conn.transport is None
            or conn.transport.is_closing()
            or len(pool.idle) >= self._max_idle
        ):
            conn.close()
            return
        conn._state = "idle"
        conn.idle_since = asyncio.get_running_loop().time()
        pool.idle.append(conn)

    def forget(self, base_url: str) -> None:
        pool = self._pools.pop(base_url, None)
        if pool is not None:
            for conn in pool.idle:
                conn.close()

    def close(self) -> None:
        self._closed = True
        for pool in self._pools.values():
            for conn in pool.idle:
                conn.close()
        self._pools.clear()
