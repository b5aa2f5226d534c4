"""The supervisor of the gateway's background loops (health checks, load scraping, discovery,
the Redis followers and publishers, the Redis probe).

Each loop is meant to run until it is cancelled. When an exception escapes one, the supervisor
logs it once (the loop's name, the exception with any URL credentials or bearer tokens masked),
counts it in `prefix_router_background_restarts_total{loop}`, waits a capped exponential backoff
with jitter (so replicas hit by the same fault do not restart in lockstep) and starts the loop
again; a loop that ran fine for `healthy_after_s` before failing starts from the initial delay
again. A loop that returns is a defect too (nothing would check the fleet any more) and is
restarted the same way. Cancellation is never swallowed: stopping the gateway stops every loop
promptly, even one whose client turned the cancellation into an error.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from prometheus_client import Counter

log = logging.getLogger("prefix_router.supervisor")

Loop = Callable[[], Awaitable[None]]
Sleep = Callable[[float], Awaitable[None]]

_CREDENTIALS = re.compile(r"(\b[a-zA-Z][\w+.-]*://)[^/@\s]*@")
_BEARER = re.compile(r"(?i)(bearer\s+)\S+")


def redact(text: str) -> str:
    """Mask what a log line must never carry: URL credentials and bearer tokens."""
    return _BEARER.sub(r"\1***", _CREDENTIALS.sub(r"\1***@", text))


@dataclass(frozen=True, slots=True)
class Backoff:
    initial_s: float = 0.5
    max_s: float = 30.0
    factor: float = 2.0
    jitter: float = 0.2
    """Share of each delay drawn at random (the delay lies in [(1 - jitter) x base, base])."""
    healthy_after_s: float = 60.0
    """A loop that ran this long before failing is restarted after the initial delay again."""

    def delay_s(self, failures: int, rng: random.Random) -> float:
        """The wait before the restart that follows `failures` earlier failures in a row."""
        base = min(self.max_s, self.initial_s * self.factor ** min(failures, 64))
        return base * (1.0 - self.jitter * rng.random())


class Supervisor:
    def __init__(
        self,
        restarts: Counter | None = None,
        backoff: Backoff | None = None,
        *,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._restarts = restarts
        self._backoff = backoff or Backoff()
        self._sleep = sleep
        self._clock = clock
        self._rng = rng or random.Random()
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, name: str, loop: Loop) -> asyncio.Task[None]:
        """Run `loop` under supervision in its own task (cancel it, or `stop()`, to end it)."""
        if self._restarts is not None:
            self._restarts.labels(name)  # the series exists (at 0) before the first restart
        task = asyncio.create_task(self.supervise(name, loop), name=f"supervised:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def stop(self, grace_s: float = 2.0) -> None:
        """Cancel every loop still running and wait until each has ended, at most `grace_s`.

        A client library may swallow a cancellation (redis-py's pipeline, cancelled while it
        reads a reply, goes on waiting for it), so a loop still running is cancelled again
        every 50 ms; one that outlives the grace is logged and left to the shutdown that
        follows (closing its client ends it), instead of hanging the gateway's exit."""
        tasks = list(self._tasks)
        deadline = asyncio.get_running_loop().time() + grace_s
        while tasks:
            for task in tasks:
                task.cancel()
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            _, pending = await asyncio.wait(tasks, timeout=min(0.05, remaining))
            tasks = list(pending)
        for task in tasks:
            log.warning("background loop %s did not stop within %.1f s", task.get_name(), grace_s)

    async def supervise(self, name: str, loop: Loop) -> None:
        failures = 0
        while True:
            started = self._clock()
            failure: BaseException | None = None
            try:
                await loop()
            except Exception as exc:
                failure = exc
            _stop_if_cancelled()
            if self._clock() - started >= self._backoff.healthy_after_s:
                failures = 0
            delay = self._backoff.delay_s(failures, self._rng)
            failures += 1
            if self._restarts is not None:
                self._restarts.labels(name).inc()
            self._log(name, failure, delay)
            await self._sleep(delay)

    @staticmethod
    def _log(name: str, failure: BaseException | None, delay: float) -> None:
        if failure is None:
            log.error(
                "background loop %s returned; restarting in %.2f s",
                name,
                delay,
                extra={"loop": name},
            )
            return
        trace = redact("".join(traceback.format_exception(failure)).rstrip())
        log.error(
            "background loop %s failed (%s); restarting in %.2f s\n%s",
            name,
            type(failure).__name__,
            delay,
            trace,
            extra={"loop": name},
        )


def _stop_if_cancelled() -> None:
    """A cancellation that the loop (or its client library) turned into an error, or swallowed,
    still stops the loop: it is never counted or restarted."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
