"""Fault injection in the simulated worker: the injector, its HTTP endpoints and request hooks.

The gateway's reliability features (retries, timeouts, outlier ejection, error events on broken
streams) need workers that fail on cue. ``FaultInjector`` holds the current script
(``workers.sim.fault_spec``) and decides, once per request, which fault that request gets. A
middleware makes the decision: faults that happen before any response (``refuse``, ``status``,
and ``hang_before_first_byte`` on non-inference endpoints) are carried out there, so the request
never reaches the engine; the others ride on the request (``SIM_FAULT``) into the completions
handler, which calls the hooks below at three points: after submitting to the engine, at the token
where the fault strikes, and (non-streamed) before the response. A hang or stall pauses the
sequence in the engine rather than just withholding bytes, so it keeps its slot and blocks like a
stuck request on a GPU; every exit path of the handler aborts the engine request, so dropped
connections and client disconnects free the sequence (the handler already guarantees this).
``/sim/*`` is never faulted: it is how tests steer the worker.

Endpoints: ``GET /sim/faults`` shows the script and per-rule state, ``POST /sim/faults`` replaces
it (a ``FaultScript`` body, or one ``FaultSpec`` object), ``DELETE /sim/faults`` clears it. Any
change releases requests hung by the previous script and restarts the seeded generator.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from workers.sim.engine import SimEngine, SimRequest
from workers.sim.fault_spec import FAULT_STATUS_TYPES, FaultScript, FaultSpec
from workers.sim.protocol import SimAPIError, bad_request

INFERENCE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
_EXEMPT_PREFIX = "/sim/"
# SO_LINGER on with a zero timeout: close() sends RST instead of FIN, as a crashed peer would.
_LINGER_RESET = struct.pack("ii", 1, 0)


@dataclass(frozen=True, slots=True)
class DrawnFault:
    """The fault one request got, and the event that ends a hang (script replaced or cleared)."""

    spec: FaultSpec
    released: asyncio.Event

    def token_limit(self, max_tokens: int) -> int | None:
        """Tokens the client gets before the fault strikes; None when it never strikes."""
        kind = self.spec.kind
        if kind == "hang_before_first_byte":
            return 0
        if kind in ("die_mid_stream", "stall_between_tokens"):
            n = self.spec.after_tokens
            return n if n < max_tokens else None  # a shorter answer completes unharmed
        return None


SIM_FAULT = web.RequestKey("sim_fault", DrawnFault)


@dataclass(slots=True)
class _Rule:
    spec: FaultSpec
    remaining: int | None  # None: unlimited
    injected: int = 0


class FaultInjector:
    """The current script and its state; one per worker, changed only through its methods."""

    def __init__(self, specs: Iterable[FaultSpec] = (), seed: int = 0) -> None:
        self.rules: list[_Rule] = []
        self.seed = seed
        self.injected = 0  # since start or the last /sim/reset, across script changes
        self.injected_by_kind: dict[str, int] = {}
        self._rng = random.Random(seed)
        self._released = asyncio.Event()
        self.set_script(FaultScript(faults=tuple(specs), seed=seed))

    @property
    def active(self) -> bool:
        return bool(self.rules)

    def set_script(self, script: FaultScript) -> None:
        self._released.set()  # whatever the old script hung is let go
        self._released = asyncio.Event()
        self.rules = [_Rule(spec, spec.count) for spec in script.faults]
        self.seed = script.seed
        self._rng = random.Random(script.seed)

    def clear(self) -> None:
        self.set_script(FaultScript(seed=self.seed))

    def reset_counters(self) -> None:
        self.injected = 0
        self.injected_by_kind.clear()

    def draw(self, inference: bool) -> DrawnFault | None:
        """Pick the fault of one request: first eligible rule, in order, that wins its draw."""
        for rule in self.rules:
            spec = rule.spec
            if rule.remaining == 0 or (not inference and spec.scope != "all"):
                continue
            if spec.probability < 1.0 and self._rng.random() >= spec.probability:
                continue
            if rule.remaining is not None:
                rule.remaining -= 1
            rule.injected += 1
            self.injected += 1
            self.injected_by_kind[spec.kind] = self.injected_by_kind.get(spec.kind, 0) + 1
            return DrawnFault(spec, self._released)
        return None

    def view(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "faults": [
                {
                    **rule.spec.public(),
                    "remaining": rule.remaining,
                    "injected": rule.injected,
                }
                for rule in self.rules
            ],
            "faults_injected": self.injected,
            "faults_injected_by_kind": dict(self.injected_by_kind),
        }


SIM_FAULTS = web.AppKey("sim_faults", FaultInjector)


# -- carrying faults out ---------------------------------------------------------------------


def drop_connection(request: web.Request, reset: bool) -> None:
    """Cut the client off without an HTTP ending: RST if ``reset``, else FIN after queued bytes."""
    transport = request.transport
    if transport is None:
        return
    if reset:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with suppress(OSError, AttributeError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        transport.abort()
    else:
        # close() flushes what the handler already wrote, so the client deterministically gets
        # exactly the tokens sent before the cut, then EOF inside the chunked body.
        transport.close()


def status_response(spec: FaultSpec) -> web.Response:
    error = SimAPIError(
        spec.status, f"Injected fault: HTTP {spec.status}", FAULT_STATUS_TYPES[spec.status]
    )
    response = error.response()
    if spec.retry_after_s is not None:
        response.headers["Retry-After"] = str(spec.retry_after_s)
    return response


def on_submit(fault: DrawnFault, engine: SimEngine, req: SimRequest) -> None:
    """Right after the engine took the request, before the handler first awaits."""
    kind = fault.spec.kind
    if kind == "slow_tokens":
        engine.set_slowdown(req, fault.spec.factor)
    elif kind == "hang_before_first_byte":
        engine.set_slowdown(req, math.inf)


async def strike(
    fault: DrawnFault, request: web.Request, engine: SimEngine, req: SimRequest
) -> bool:
    """Carry the fault out at its token limit; True when the connection is gone."""
    spec = fault.spec
    if spec.kind == "die_mid_stream":
        drop_connection(request, reset=False)
        return True
    if spec.kind == "hang_before_first_byte":
        await fault.released.wait()  # a client disconnect cancels this (handler_cancellation)
    elif spec.kind == "stall_between_tokens":
        engine.set_slowdown(req, math.inf)
        await asyncio.sleep(spec.stall_s)
    engine.set_slowdown(req, 1.0)
    return False


async def before_response(
    fault: DrawnFault, request: web.Request, engine: SimEngine, req: SimRequest
) -> bool:
    """Non-streamed requests: wait for the fault's token, then strike; True if the connection is
    gone. The handler submitted with ``stream_tokens`` so that per-token progress wakes us."""
    limit = fault.token_limit(req.max_tokens)
    if limit is None:
        return False
    while req.num_generated < limit and not req.done:
        await engine.wait_progress(req, req.num_generated)
    return await strike(fault, request, engine, req)


# -- middleware and endpoints ------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def fault_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    injector = request.app[SIM_FAULTS]
    if not injector.rules or request.path.startswith(_EXEMPT_PREFIX):
        return await handler(request)
    inference = request.path in INFERENCE_PATHS
    fault = injector.draw(inference)
    if fault is None:
        return await handler(request)
    kind = fault.spec.kind
    if kind == "refuse":
        drop_connection(request, reset=True)
        # Nothing reaches the client; aiohttp drops the write of this placeholder quietly.
        return web.Response(status=500)
    if kind == "status":
        return status_response(fault.spec)
    if not inference:  # only hang_before_first_byte is allowed here (scope "all")
        await fault.released.wait()
        return await handler(request)
    request[SIM_FAULT] = fault
    return await handler(request)


async def get_faults(request: web.Request) -> web.Response:
    return web.json_response(request.app[SIM_FAULTS].view())


async def post_faults(request: web.Request) -> web.Response:
    injector = request.app[SIM_FAULTS]
    try:
        body = json.loads(await request.read())
        if isinstance(body, dict) and "kind" in body:
            body = {"faults": [body], "seed": injector.seed}  # one rule: keep the seed
        script = FaultScript.model_validate(body)
    except ValueError as exc:  # bad JSON and ValidationError alike
        message = str(exc) if not isinstance(exc, ValidationError) else _explain(exc)
        return bad_request(f"Invalid fault script: {message}").response()
    injector.set_script(script)
    return web.json_response(injector.view())


async def delete_faults(request: web.Request) -> web.Response:
    injector = request.app[SIM_FAULTS]
    injector.clear()
    return web.json_response(injector.view())


def _explain(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())


def install_faults(app: web.Application, injector: FaultInjector) -> None:
    """Add the middleware and the ``/sim/faults`` endpoints to a simulated worker's app."""
    app[SIM_FAULTS] = injector
    app.middlewares.append(fault_middleware)
    app.router.add_get("/sim/faults", get_faults)
    app.router.add_post("/sim/faults", post_faults)
    app.router.add_delete("/sim/faults", delete_faults)
