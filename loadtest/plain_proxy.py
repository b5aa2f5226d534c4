"""The baseline of `bench overhead`: a plain aiohttp + uvloop streaming proxy, round robin.

What any Python gateway costs at the least: accept the request, read its body, send it to the
next worker over a kept-alive aiohttp client connection, and stream the answer back chunk by
chunk. No auth, limits, routing, metrics or logs. `python -m loadtest.plain_proxy --port P
URL...`.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web

_CLIENT = web.AppKey("client", aiohttp.ClientSession)
_PASSED = ("Content-Type", "Cache-Control")


def build_proxy(workers: list[str]) -> web.Application:
    turn = itertools.cycle(workers)

    async def relay(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        upstream = await request.app[_CLIENT].request(
            request.method,
            next(turn) + request.path,
            data=body,
            headers={"Content-Type": "application/json"},
        )
        async with upstream:
            response = web.StreamResponse(status=upstream.status)
            for name in _PASSED:
                if name in upstream.headers:
                    response.headers[name] = upstream.headers[name]
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    async def client(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=4.0)
        app[_CLIENT] = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        yield
        await app[_CLIENT].close()

    app = web.Application()
    app.cleanup_ctx.append(client)
    app.router.add_post("/v1/chat/completions", relay)
    app.router.add_post("/v1/completions", relay)
    app.router.add_get("/v1/models", relay)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("workers", nargs="+")
    args = parser.parse_args()
    web.run_app(
        build_proxy([w.rstrip("/") for w in args.workers]),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
