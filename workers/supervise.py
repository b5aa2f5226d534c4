"""Supervising ``vllm serve`` and its agent: start both, forward signals, outlive neither.

``supervise`` starts both, forwards SIGTERM and SIGINT to them, and exits with vLLM's exit code
when vLLM exits; the agent is only a helper and never outlives it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from types import FrameType

log = logging.getLogger("workers.launch")


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode  # killed by N -> 128+N, as shells


def _stop(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        log.warning("pid %d ignored SIGTERM for %.0f s; killing it", proc.pid, timeout_s)
        proc.kill()
        proc.wait()


def supervise(
    vllm_argv: list[str],
    env: dict[str, str],
    agent_argv: list[str] | None,
    stop_timeout_s: float = 30.0,
) -> int:
    """Run vLLM (and the agent) until vLLM exits; return its exit code.

    Children get their own session, so a terminal's Ctrl-C reaches them once, from us, rather
    than twice (vLLM takes a second SIGINT as a demand to die at once). A vLLM that has not
    exited ``stop_timeout_s`` after the first forwarded signal is killed.
    """
    procs: list[subprocess.Popen[bytes]] = []
    stop_requested_at: list[float] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        if not stop_requested_at:
            stop_requested_at.append(time.monotonic())
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        vllm = subprocess.Popen(vllm_argv, env={**os.environ, **env}, start_new_session=True)
        procs.append(vllm)
        agent = None
        if agent_argv is not None:
            agent = subprocess.Popen(agent_argv, start_new_session=True)
            procs.append(agent)
        while True:
            # A bounded wait, so the kill deadline and the agent's health get looked at.
            try:
                returncode = vllm.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                pass
            if stop_requested_at and time.monotonic() - stop_requested_at[0] > stop_timeout_s:
                log.warning("vllm ignored the signal for %.0f s; killing it", stop_timeout_s)
                vllm.kill()
            if agent is not None and agent.poll() is not None:
                # The agent only feeds the router; vLLM keeps serving without it.
                log.warning("the agent exited with %d; vllm keeps running", agent.returncode)
                agent = None
        log.info("vllm exited with %d", returncode)
        return _exit_code(returncode)
    finally:
        for proc in procs:
            _stop(proc, stop_timeout_s)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
