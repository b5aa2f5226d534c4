"""Where a router's cache hits went: each request's route against what every worker held then.

`prefix-router bench routing --records PATH` writes what each request saw (its worker, from the
gateway's debug headers, and the cached tokens the worker reported). This replays those routes
in arrival order through one LRU per worker of the fleet's capacity (the simulated worker's
blocks, as `loadtest.intrinsic` counts them: prompt and computed output, whole 16-token
blocks), and for every request compares the worker chosen with the worker holding the longest
prefix at that moment. It prints how closely the replay reproduces what workers reported (it
ignores concurrency, so it is an approximation), how closely the gateway's index predicted it,
and the *regret*: the share of prompt tokens another worker held beyond the chosen one's, by
decision reason, with the largest cases. A regret of 0 is the most any router could keep given
where earlier requests went; a router that pays regret bought lower queueing with it.
`prefix-router bench routing-regret RECORDS --kv-blocks N` (N: the run's blocks per worker).
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass, field

from loadtest.intrinsic import BlockLru, ChatTokens
from loadtest.replay import Record, read_records


@dataclass
class Regret:
    prompt_tokens: int = 0
    reported: int = 0
    """Cached tokens the workers reported."""
    replayed: int = 0
    """Cached tokens the per-worker LRU replay gives the chosen workers."""
    replay_error: int = 0
    """Sum over requests of |replayed - reported|."""
    best: int = 0
    """Cached tokens had each request gone to the worker holding the most of it."""
    predicted: int = 0
    """The gateway's own prediction for its choice (X-Route-Matched-Tokens)."""
    by_reason: Counter[str] = field(default_factory=Counter)
    """Regret tokens per decision reason."""
    largest: list[tuple[int, int, int, int, str, str]] = field(default_factory=list)
    """(regret, request index, chosen's tokens, best's tokens, chosen, best), largest first."""


def routing_regret(records: list[Record], kv_blocks: int, keep: int = 10) -> Regret:
    tokens = ChatTokens()
    lrus: dict[str, BlockLru] = {}
    out = Regret()
    for i, record in enumerate(r for r in records if r.ok):
        prompt, answer = tokens.prompt(record.messages), tokens.answer(record.answer)
        held = {w: lru.leading(prompt) for w, lru in lrus.items()}
        mine = held.get(record.worker, 0)
        best_worker = max(held, key=held.__getitem__, default=record.worker)
        best = max(mine, held.get(best_worker, 0))
        reported = record.cached_tokens or 0
        out.prompt_tokens += len(prompt)
        out.reported += reported
        out.replayed += mine
        out.replay_error += abs(mine - reported)
        out.best += best
        out.predicted += record.matched_tokens
        if best > mine:
            out.by_reason[record.reason or "-"] += best - mine
            out.largest.append((best - mine, i, mine, best, record.worker, best_worker))
        lrus.setdefault(record.worker, BlockLru(kv_blocks)).add(prompt, answer)
    out.largest = sorted(out.largest, reverse=True)[:keep]
    return out


def report(regret: Regret) -> list[str]:
    total = max(1, regret.prompt_tokens)

    def share(tokens: int) -> str:
        return f"{tokens / total:.2%}"

    lines = [
        f"prompt tokens {regret.prompt_tokens}: reported cached {share(regret.reported)}, "
        f"replayed {share(regret.replayed)} (off by {share(regret.replay_error)} in all), "
        f"predicted by the gateway {share(regret.predicted)}",
        f"the best worker each time: {share(regret.best)}; regret "
        f"{share(regret.best - regret.replayed)}",
    ]
    lines += [f"  {reason}: {share(tokens)}" for reason, tokens in regret.by_reason.most_common()]
    lines += [
        f"  request {i}: {mine} cached on {chosen}, {best} on {best_worker} (regret {lost})"
        for lost, i, mine, best, chosen, best_worker in regret.largest
    ]
    return lines


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="prefix-router bench routing-regret", description=__doc__.split("\n")[0]
    )
    parser.add_argument("records", help="a file written by `bench routing --records`")
    parser.add_argument("--kv-blocks", type=int, required=True, help="KV blocks per worker")
    args = parser.parse_args(argv)
    for line in report(routing_regret(read_records(args.records), args.kv_blocks)):
        print(line)
    return 0
