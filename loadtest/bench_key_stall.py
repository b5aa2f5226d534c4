"""How long keying a cold long prompt for precise routing stalls the event loop
(`prefix-router bench key-stall`).

A ticker on the loop wakes every millisecond and records how late it woke, while the loop keys
`--prompts` cold prompts of `--tokens` words each (the word tokenizer, vLLM's block hashing),
first inline (as before the helper process) and then through `OffloadedKeyer`, which keys
prompts longer than 8192 characters in its helper process. It prints the worst and p99 lateness
of the ticker and the time each prompt's key took to come back.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from typing import Any

from loadtest.stats import percentile, print_table
from router.config import PreciseConfig
from router.routing.offloaded_key import OffloadedKeyer


async def _ticker(stop: asyncio.Event, late: list[float]) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        due = loop.time() + 0.001
        await asyncio.sleep(0.001)
        late.append(loop.time() - due)


async def _measure(keyer: OffloadedKeyer, bodies: list[dict[str, Any]], offload: bool) -> list[Any]:
    stop = asyncio.Event()
    late: list[float] = []
    ticker = asyncio.create_task(_ticker(stop, late))
    took = []
    for body in bodies:
        await asyncio.sleep(0.01)
        start = time.perf_counter()
        chars = len(body["messages"][0]["content"])
        if offload:
            await keyer.key_async(body, True, chars)
        else:
            keyer.key(body, True)
        took.append(time.perf_counter() - start)
    stop.set()
    await ticker
    ms = [1000 * x for x in late]
    return [max(ms), percentile(ms, 99), 1000 * percentile(took, 50)]


async def _main(args: argparse.Namespace) -> int:
    rng = random.Random(3)

    def cold() -> dict[str, Any]:
        words = " ".join(f"w{rng.getrandbits(48)}" for _ in range(args.tokens))
        return {"messages": [{"role": "user", "content": words}]}

    keyer = OffloadedKeyer(PreciseConfig(tokenizer="word"))
    await keyer.key_async(cold(), True, 1 << 20)  # start the helper before measuring
    rows = []
    for name, offload in (("inline", False), ("helper process", True)):
        bodies = [cold() for _ in range(args.prompts)]
        rows.append([name, *(round(v, 2) for v in await _measure(keyer, bodies, offload))])
    keyer.close()
    print(f"\nloop stall while keying {args.prompts} cold {args.tokens}-token prompts")
    print_table(["keying", "loop late max ms", "loop late p99 ms", "key p50 ms"], rows)
    return 0


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prefix-router bench key-stall", description=__doc__)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=16000)
    args = parser.parse_args(argv)
    return asyncio.run(_main(args))
