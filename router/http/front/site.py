"""The listening socket: connections start on the front, which serves the model endpoints and
hands every other request to the aiohttp application behind it.

`FrontSite` is an aiohttp site, so the runner starts and stops it with the rest: on stop the
listener closes, idle connections close, and requests in flight get the drain timeout to end
before they are cancelled (aiohttp's own connections then drain the same way).
"""

from __future__ import annotations

import asyncio
from functools import partial

from aiohttp import web

from router.config import GatewayConfig
from router.http.body import Kind
from router.http.context import GatewayState, new_request_id
from router.http.front.exchange import FrontExchange, Incoming, Written
from router.http.front.protocol import Front, FrontConnection, Refusal
from router.http.middleware import (
    CLIENT_GONE,
    Outcome,
    failure_reply,
    record,
    record_refusal,
)
from router.http.openai import completions

_KINDS: dict[bytes, Kind] = {b"/v1/chat/completions": "chat", b"/v1/completions": "completions"}


async def serve(state: GatewayState, conn: FrontConnection, incoming: Incoming) -> Written:
    """One model request, as aiohttp's edge middleware and handler would run it."""
    headers = incoming.headers
    exchange = FrontExchange(conn, incoming, new_request_id(headers.get("x-request-id")))
    outcome = Outcome()
    try:
        try:
            reply = outcome.answered(await completions(exchange, state, _KINDS[incoming.path]))
        except BaseException as exc:
            # A client that went away is re-raised: the connection is closing already.
            reply = failure_reply(exc, exchange, outcome)
        written = exchange.send(reply)
        if written is Written.GONE:
            outcome.status = CLIENT_GONE
        return written
    finally:
        record(state, exchange, outcome)  # after the answer's last byte went out


def refused(state: GatewayState, refusal: Refusal) -> None:
    """A refusal the front wrote is a request like any other in the metrics and the log."""
    record_refusal(state, refusal, refusal.error.status)


class FrontSite(web.BaseSite):
    __slots__ = ("_drain_s", "_front", "_host", "_port", "_state")

    def __init__(
        self,
        runner: web.AppRunner,
        state: GatewayState,
        host: str,
        port: int,
        drain_s: float,
        backlog: int = 1024,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._state = state
        self._host = host
        self._port = port
        self._drain_s = drain_s
        self._front: Front | None = None

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None, "the runner is set up"
        state = self._state
        front = Front(
            partial(serve, state),
            server,
            state.config.limits.max_body_bytes,
            refused=partial(refused, state),
        )
        self._front = front

        def follow(config: GatewayConfig) -> None:
            front.max_body_bytes = config.limits.max_body_bytes

        state.on_reload.append(follow)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            front, self._host, self._port, backlog=self._backlog
        )
        if self._server.sockets:
            self._port = self._server.sockets[0].getsockname()[1]

    @property
    def port(self) -> int:
        return self._port

    async def stop(self) -> None:
        """Close the listener, then drain the front's connections and those it handed to
        aiohttp together, within one drain timeout (the runner's own aiohttp drain that
        follows then finds nothing left)."""
        if self._server is not None:
            self._server.close()
        server = self._runner.server
        drains = [self._drain_front()]
        if server is not None:
            server.pre_shutdown()  # handed-over connections close after their request
            drains.append(server.shutdown(self._drain_s))
        await asyncio.gather(*drains)
        await super().stop()

    async def _drain_front(self) -> None:
        front = self._front
        if front is None:
            return
        front.closing = True
        busy = []
        for conn in list(front.connections):
            if conn.task is None:
                conn.close()
            else:
                conn.closing = True
                busy.append(conn)
        tasks = [conn.task for conn in busy if conn.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=self._drain_s)
        for conn in busy:
            conn.cancel()
        left = [conn.task for conn in busy if conn.task is not None]
        if left:
            await asyncio.wait(left)  # cancelled: their cleanup runs before the app's
