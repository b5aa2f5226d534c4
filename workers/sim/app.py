"""HTTP face of the simulated vLLM worker: the aiohttp application and its handlers.

``build_sim_app`` wires one worker from its config: tokenizer, prefix cache, engine, metrics,
all stored under typed app keys (no global state), with the engine's single task started and
stopped through ``cleanup_ctx``. Handlers speak vLLM's OpenAI API (completions and chat, streamed
or not), ``/health``, ``/v1/models`` and ``/metrics``, plus two simulator-only endpoints:
``GET /sim/counters`` (exact counters for tests and benchmarks) and ``POST /sim/reset``. A handler
that exits before its request finished (the client disconnected, which cancels the handler when
the runner enables ``handler_cancellation``, or a write failed) aborts the request in the engine,
as vLLM does. Fault injection (``workers.sim.faults``) adds a middleware and ``/sim/faults``; a
request that drew a fault carries it into ``_serve``, which calls its hooks.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
import zlib
from array import array
from collections.abc import AsyncIterator
from contextlib import suppress
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from workers.sim import faults
from workers.sim.cache import PrefixCache
from workers.sim.config import SimConfig
from workers.sim.engine import RequestState, RequestTooLargeError, SimEngine, SimRequest
from workers.sim.kv_publisher import install_kv_events
from workers.sim.kv_transfer import pull, remote_prefill, transfer_params, wants_remote_decode
from workers.sim.lora import install_lora_routes
from workers.sim.metrics import SimMetrics
from workers.sim.protocol import (
    DONE_EVENT,
    SSE_HEADERS,
    WORD_BYTES,
    WORD_TEXT,
    Kind,
    ParsedRequest,
    SimAPIError,
    StreamEncoder,
    bad_request,
    full_response,
    json_object,
    parse_request,
)
from workers.sim.tokenizer import OUTPUT_WORDS, PromptTokenizer, build_sim_tokenizer


@dataclass(slots=True)
class SimState:
    """Everything one simulated worker owns."""

    config: SimConfig
    tokenizer: PromptTokenizer
    word_ids: tuple[int, ...]
    """Token ids of the output vocabulary under the tokenizer (`protocol.WORD_IDS` for words)."""
    cache: PrefixCache
    engine: SimEngine
    metrics: SimMetrics
    created_s: int
    engine_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    """vLLM's KV-transfer engine id (`remote_engine_id` in a prefill's answer)."""


SIM_STATE = web.AppKey("sim_state", SimState)
SIM_HTTP = web.AppKey("sim_http", aiohttp.ClientSession)
"""The decode side's client of prefill workers' KV side channel."""


def next_words(
    prompt_ids: list[int], count: int, word_ids: tuple[int, ...], seed: int
) -> list[int]:
    """The answer's words (indexes into the output vocabulary): each a function of the token
    sequence before it (a CRC-32 chained over the token ids, then over each word's id), so a
    worker given the prompt plus the first k words continues exactly as the first would have:
    a migrated stream reads like the uninterrupted one."""
    state = zlib.crc32(array("Q", prompt_ids).tobytes(), seed & 0xFFFFFFFF)
    size = len(word_ids)
    words = []
    for _ in range(count):
        index = state % size
        words.append(index)
        state = zlib.crc32(word_ids[index].to_bytes(8, "little"), state)
    return words


def _kv_load_failed() -> SimAPIError:
    # vLLM with kv_load_failure_policy "fail": the decode worker could not read the KV.
    return SimAPIError(
        500, "Failed to load the KV cache from the prefill worker", "InternalServerError"
    )


def _engine_stopped() -> SimAPIError:
    return SimAPIError(500, "The engine stopped before the request finished", "InternalServerError")


async def _serve(request: web.Request, kind: Kind) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    engine = state.engine
    fault = request.get(faults.SIM_FAULT)  # almost always None: see workers.sim.faults
    try:
        parsed = parse_request(
            await request.read(),
            kind,
            state.config,
            state.tokenizer,
            request.headers.get("X-Request-Id"),
            engine.adapters.paths,
        )
        words = next_words(parsed.prompt_ids, parsed.max_tokens, state.word_ids, state.config.seed)
        role = state.config.role
        lease = role != "decode" and not parsed.stream and wants_remote_decode(parsed.kv_transfer)
        remote = remote_prefill(parsed.kv_transfer) if role != "prefill" else None
        if remote is not None:
            if not await pull(request.app[SIM_HTTP], remote, 5.0):
                return _kv_load_failed().response()
            cfg = state.config  # the transfer itself: the KV crosses the network
            await asyncio.sleep(
                len(parsed.prompt_ids) * cfg.kv_transfer_s_per_token * cfg.time_scale
            )
        req = engine.submit(
            parsed.request_id,
            parsed.prompt_ids,
            [state.word_ids[i] for i in words],
            parsed.cache_salt,
            stream_tokens=parsed.stream or fault is not None,  # faults strike at a token
            lora=parsed.lora,
            lease=lease,
            remote_prefilled=remote is not None,
        )
    except SimAPIError as exc:
        return exc.response()
    except RequestTooLargeError as exc:
        return bad_request(str(exc)).response()
    if fault is not None:
        faults.on_submit(fault, engine, req)
    try:
        if parsed.stream:
            return await _stream(request, state, parsed, req, words, fault)
        if fault is not None and await faults.before_response(fault, request, engine, req):
            return web.Response()  # never sent: the fault dropped the connection
        await engine.wait_done(req)
        if req.state is not RequestState.FINISHED:
            return _engine_stopped().response()
        body = full_response(
            parsed,
            int(time.time()),
            _served_name(state, parsed),
            "".join([WORD_TEXT[i] for i in words]),
            req.num_generated,
            req.num_cached_tokens,
        )
        if lease:
            url = request.url
            body["kv_transfer_params"] = transfer_params(
                req.block_ids, state.engine_id, req.request_id, url.host or "", url.port or 0
            )
        return web.json_response(body)
    finally:
        # Cancelled (client gone), write failed, or engine stopped: free the sequence now.
        engine.abort(req)


async def _stream(
    request: web.Request,
    state: SimState,
    parsed: ParsedRequest,
    req: SimRequest,
    words: list[int],
    fault: faults.DrawnFault | None,
) -> web.StreamResponse:
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    encoder = StreamEncoder(
        parsed.kind, parsed.request_id, int(time.time()), _served_name(state, parsed)
    )
    engine = state.engine
    write = response.write
    token_chunk = encoder.token_chunk
    last_index = req.max_tokens - 1
    seen = 0
    # A fault holds tokens back from this index on until it has struck (die, stall, hang).
    cut = fault.token_limit(req.max_tokens) if fault is not None else None
    limit = req.max_tokens if cut is None else cut
    try:
        while True:
            if seen == limit and fault is not None:
                if await faults.strike(fault, request, engine, req):
                    return response
                limit = req.max_tokens
            await engine.wait_progress(req, seen)
            produced = req.num_generated
            if produced > limit:
                produced = limit
            parts: list[bytes] = []
            if seen == 0 and produced and parsed.kind == "chat":
                # vLLM sends the role chunk with the first output, i.e. after the prefill.
                parts.append(encoder.role_chunk())
            for index in range(seen, produced):
                parts.append(token_chunk(WORD_BYTES[words[index]], index == last_index))
            seen = produced
            held = produced < req.num_generated  # the engine may be ahead of a fault's cut
            if req.state is RequestState.FINISHED and not held:
                if parsed.include_usage:
                    parts.append(
                        encoder.usage_chunk(req.num_prompt, produced, req.num_cached_tokens)
                    )
                parts.append(DONE_EVENT)
            elif req.state is RequestState.ABORTED and not held:
                parts.append(encoder.error_chunk(_engine_stopped()))
                parts.append(DONE_EVENT)
            if parts:
                await write(b"".join(parts))
            if req.done and not held:
                break
    except ConnectionResetError:
        return response  # the client left; _serve's finally aborts the request
    await response.write_eof()
    return response


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, "completion")


async def health(request: web.Request) -> web.Response:
    return web.Response(status=200)


def _served_name(state: SimState, parsed: ParsedRequest) -> str:
    """vLLM answers with the adapter's name when the request named one."""
    return parsed.lora[0] if parsed.lora is not None else state.config.model


async def models(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    cfg = state.config
    card = {
        "id": cfg.model,
        "object": "model",
        "created": state.created_s,
        "owned_by": "vllm",
        "root": cfg.model,
        "parent": None,
        "max_model_len": cfg.max_model_len,
        "permission": [
            {
                "id": "modelperm-" + random.Random(cfg.model).randbytes(8).hex(),
                "object": "model_permission",
                "created": state.created_s,
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }
        ],
    }
    # One card per adapter after the base model's, as vLLM lists them (no max_model_len).
    adapters = [
        {**card, "id": name, "root": path, "parent": cfg.model, "max_model_len": None}
        for name, path in state.engine.adapters.paths.items()
    ]
    return web.json_response({"object": "list", "data": [card, *adapters]})


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[SIM_STATE].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def sim_counters(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    engine = state.engine
    counters = engine.counters
    return web.json_response(
        {
            "requests": counters.requests,
            "prompt_tokens": counters.prompt_tokens,
            "cached_tokens": counters.cached_tokens,
            "generation_tokens": counters.generation_tokens,
            "finished": counters.finished,
            "aborted": counters.aborted,
            "running": engine.num_running,
            "waiting": engine.num_waiting,
            "cached_blocks": state.cache.cached_blocks,
            "free_blocks": state.cache.free_blocks,
            "num_gpu_blocks": state.cache.num_blocks,
            "kv_cache_usage": state.cache.usage,
            "faults_injected": request.app[faults.SIM_FAULTS].injected,
            "lora_loads": engine.adapters.loads,
            "kv_leases": len(engine.leases),
            "lora_resident": engine.adapters.resident,
        }
    )


async def sim_kv_pull(request: web.Request) -> web.Response:
    """The simulator's KV side channel: a decode worker reads a leased request's blocks."""
    body = await json_object(request)
    request_id = body.get("remote_request_id")
    leases = request.app[SIM_STATE].engine.leases
    if not isinstance(request_id, str) or not leases.release(request_id):
        return web.json_response({"error": "no such lease"}, status=404)
    return web.json_response({"success": True})


async def sim_reset(request: web.Request) -> web.Response:
    request.app[SIM_STATE].engine.reset()
    request.app[faults.SIM_FAULTS].reset_counters()
    return web.json_response({"success": True})


async def _kv_client(app: web.Application) -> AsyncIterator[None]:
    async with aiohttp.ClientSession() as session:
        app[SIM_HTTP] = session
        yield


async def _run_engine(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(app[SIM_STATE].engine.run(), name="sim-engine")
    yield
    task.cancel()
    with suppress(asyncio.CancelledError):
        await task


def build_sim_state(config: SimConfig) -> SimState:
    cache = PrefixCache(config.num_gpu_blocks, config.block_size)
    engine = SimEngine(config, cache)
    tokenizer = build_sim_tokenizer(config)
    return SimState(
        config=config,
        tokenizer=tokenizer,
        word_ids=tuple(tokenizer.word_token_id(w) for w in OUTPUT_WORDS),
        cache=cache,
        engine=engine,
        metrics=SimMetrics(config, engine),
        created_s=int(time.time()),
    )


def build_sim_app(config: SimConfig) -> web.Application:
    """Build a fresh simulated worker; serve it with ``handler_cancellation=True`` (see runner)."""
    app = web.Application(client_max_size=64 * 1024 * 1024)  # long prompts are the point
    app[SIM_STATE] = build_sim_state(config)
    app.cleanup_ctx.append(_kv_client)
    app.cleanup_ctx.append(_run_engine)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    if config.runtime_lora_updating:  # else 404, as vLLM without the environment variable
        install_lora_routes(app, app[SIM_STATE].engine.adapters)
    app.router.add_get("/sim/counters", sim_counters)
    app.router.add_post("/sim/reset", sim_reset)
    app.router.add_post("/sim/kv_pull", sim_kv_pull)
    faults.install_faults(app, faults.FaultInjector(config.faults, config.fault_seed))
    install_kv_events(app, config, app[SIM_STATE].cache)  # after the engine: stops first
    return app
