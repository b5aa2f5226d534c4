"""Replay a workload against one gateway and record what every request saw at the client.

Each script runs as its own task from its start time (open loop: arrivals never wait for the
fleet); a session's next turn is sent a think time after its previous answer arrived and carries
that answer as the assistant message, with the session id in `X-Session-Id`. Requests stream with
`stream_options.include_usage`; TTFT is the arrival of the first chunk with content, E2E the end
of the stream, and the worker's usage (prompt and cached tokens) is kept for cross-checks.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from loadtest.workloads import Script, Workload


@dataclass(slots=True)
class Record:
    sent_s: float
    messages: list[dict[str, Any]]
    answer: str = ""
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    worker: str = ""
    reason: str = ""
    matched_tokens: int = 0
    """The gateway's choice and the prompt tokens it expected cached there, from its debug
    headers (for analysis only)."""
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.e2e_s is not None


@dataclass
class Replay:
    records: list[Record] = field(default_factory=list)
    elapsed_s: float = 0.0
    lag_s: list[float] = field(default_factory=list)
    """How late each script started against its schedule (load generator starved if large)."""


async def replay(
    urls: str | list[str], model: str, workload: Workload, timeout_s: float = 120.0
) -> Replay:
    """Replay the workload; with several gateway URLs, requests take them in turn."""
    targets = [urls] if isinstance(urls, str) else urls
    turn = itertools.count()

    def url_of_next() -> str:
        return targets[next(turn) % len(targets)]

    result = Replay()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks = [
            asyncio.create_task(_run_script(session, url_of_next, model, script, start, result))
            for script in workload.scripts
        ]
        await asyncio.gather(*tasks)
        result.elapsed_s = loop.time() - start
    result.records.sort(key=lambda r: r.sent_s)
    return result


async def _run_script(
    session: aiohttp.ClientSession,
    url_of_next: Callable[[], str],
    model: str,
    script: Script,
    start: float,
    result: Replay,
) -> None:
    loop = asyncio.get_running_loop()
    delay = start + script.start_s - loop.time()
    if delay > 0:
        await asyncio.sleep(delay)
    result.lag_s.append(max(0.0, loop.time() - start - script.start_s))
    headers = {"Content-Type": "application/json"}
    if script.session_id is not None:
        headers["X-Session-Id"] = script.session_id
    messages: list[dict[str, Any]] = [{"role": "system", "content": script.system}]
    for n, turn in enumerate(script.turns):
        if n:
            await asyncio.sleep(turn.think_s)
        messages = [*messages, {"role": "user", "content": turn.user}]
        record = Record(sent_s=loop.time() - start, messages=messages)
        result.records.append(record)
        body = {
            "model": model,
            "messages": messages,
            "max_tokens": turn.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        await _send(session, url_of_next(), json.dumps(body).encode(), headers, record)
        if not record.ok:
            return  # a session cannot go on without its answer
        messages = [*messages, {"role": "assistant", "content": record.answer}]


async def _send(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    record: Record,
) -> None:
    started = time.perf_counter()
    parts: list[str] = []
    done = False
    try:
        async with session.post(url + "/v1/chat/completions", data=body, headers=headers) as resp:
            if resp.status != 200:
                record.error = f"http {resp.status}"
                await resp.read()
                return
            record.worker = resp.headers.get("X-Route-Worker", "")
            record.reason = resp.headers.get("X-Route-Reason", "")
            record.matched_tokens = int(resp.headers.get("X-Route-Matched-Tokens") or 0)
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    record.error = "stream error"
                    return
                for choice in event.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        if record.ttft_s is None:
                            record.ttft_s = time.perf_counter() - started
                        parts.append(text)
                usage = event.get("usage")
                if usage:
                    record.prompt_tokens = usage.get("prompt_tokens")
                    record.output_tokens = usage.get("completion_tokens") or 0
                    details = usage.get("prompt_tokens_details") or {}
                    record.cached_tokens = details.get("cached_tokens")
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        record.error = type(exc).__name__
        return
    if not done:
        record.error = "no [DONE]"
        return
    record.e2e_s = time.perf_counter() - started
    record.answer = "".join(parts)
    if not record.output_tokens:
        record.output_tokens = len(parts)


def write_records(path: str, records: list[Record]) -> None:
    """One JSON object per request, in arrival order (`read_records` reads them back)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(asdict(record)) + "\n")


def read_records(path: str) -> list[Record]:
    with open(path) as f:
        return [Record(**json.loads(line)) for line in f if line.strip()]
