"""External routers (the peers) in front of a benchmark's fleet: `--router-cmd` / `--router-name`.

A template is one shell-like command line with placeholders: `{port}` (a free port the router must
listen on, on 127.0.0.1), `{workers}` (the workers' base URLs, space-separated), `{workers_csv}`
(comma-separated) and `{model}`. The router is ready when `GET /v1/models` answers 200 (every
OpenAI-compatible router serves it) and a first tiny completion goes through, so a router that
discovers workers lazily is not timed while it starts. Install the peers in a venv of their own,
never beside the project (see the README's routing section).
"""

from __future__ import annotations

import asyncio
import shlex
import time

import aiohttp

from loadtest.procs import Proc, free_port, spawn


def parse_routers(cmds: list[str] | None, names: list[str] | None) -> list[tuple[str, str]]:
    """Pair each `--router-cmd` with its `--router-name` (default: the program's name)."""
    cmds = cmds or []
    names = names or []
    if len(names) > len(cmds):
        raise SystemExit("more --router-name than --router-cmd")
    pairs = []
    for n, cmd in enumerate(cmds):
        name = names[n] if n < len(names) else shlex.split(cmd)[0].rsplit("/", 1)[-1]
        pairs.append((name, cmd))
    return pairs


def start_external(template: str, worker_urls: list[str], model: str) -> Proc:
    port = free_port()
    line = template.format(
        port=port,
        workers=" ".join(worker_urls),
        workers_csv=",".join(worker_urls),
        model=model,
    )
    return spawn(shlex.split(line), f"http://127.0.0.1:{port}", f"ext{port}")


async def wait_external(proc: Proc, model: str, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    body = {"model": model, "prompt": "ready", "max_tokens": 1}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise RuntimeError(
                    f"router exited with {proc.popen.returncode}; see {proc.log_path}"
                )
            try:
                async with session.get(proc.url + "/v1/models") as resp:
                    if resp.status == 200:
                        async with session.post(proc.url + "/v1/completions", json=body) as r:
                            if r.status == 200:
                                await r.read()
                                return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"router {proc.url} not ready within {timeout_s}s; see {proc.log_path}")
