"""Seeded workloads for the policy benchmark: what is sent, when, and how large its working set is.

A workload is a list of `Script`s, each a conversation that starts at a fixed time: one turn for
the open-loop workloads (shared system prompts, unique long prompts), several for chat sessions,
whose next turn is sent a think time after the previous answer arrived (so only the start times
are Poisson; the rest follows the fleet's speed). Text is made of random three-letter
pseudo-words: the simulated worker's tokenizer counts one token per word, and three letters plus
a space keep the gateway's four-characters-per-token estimate honest. Every text starts with a
tag naming its origin, so distinct prompts never share a prefix by chance. Each workload also
estimates its working set (the distinct prompt tokens that are live at once), which sizes the
simulated KV caches so that one worker cannot hold it but the fleet nearly can.
"""

from __future__ import annotations

import math
import random
import string
from dataclasses import dataclass

BLOCK_TOKENS = 16
"""vLLM's block size, as the simulated workers use it."""


@dataclass(frozen=True, slots=True)
class Turn:
    user: str
    max_tokens: int
    think_s: float = 0.0
    """Pause after the previous answer before this turn is sent (0 for a first turn)."""


@dataclass(frozen=True, slots=True)
class Script:
    start_s: float
    system: str
    turns: tuple[Turn, ...]
    session_id: str | None = None


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    description: str
    scripts: tuple[Script, ...]
    working_set_tokens: int
    """Distinct prompt tokens live at once (prefixes worth keeping cached), estimated."""
    largest_request_tokens: int

    @property
    def requests(self) -> int:
        return sum(len(s.turns) for s in self.scripts)

    @property
    def working_set_blocks(self) -> int:
        return math.ceil(self.working_set_tokens / BLOCK_TOKENS)


@dataclass(frozen=True)
class SharedSpec:
    """G groups x P prompts: each request is a group's system prompt plus one of its questions."""

    groups: int = 8
    prompts: int = 32
    system_tokens: int = 2000
    question_tokens: int = 60
    max_tokens: int = 32
    rate: float = 40.0
    duration_s: float = 40.0


@dataclass(frozen=True)
class MultiturnSpec:
    """Chat sessions over a few shared system prompts; each session sends `turns` requests."""

    sessions: int = 56
    session_rate: float = 3.5
    system_prompts: int = 4
    system_tokens: int = 1000
    user_tokens: int = 200
    turns_min: int = 4
    turns_max: int = 8
    max_tokens: int = 128
    think_s: float = 1.0
    est_turn_s: float = 1.0
    """Expected answer time, only for the working-set estimate."""


@dataclass(frozen=True)
class MixedSpec:
    """The shared workload plus unique long prompts that nobody can reuse."""

    shared: SharedSpec = SharedSpec(rate=18.0)
    unique_rate: float = 4.0
    unique_tokens: int = 3000


def words(rng: random.Random, n: int, tag: str) -> str:
    """`n` pseudo-words (one simulated token each), the first being `tag`."""
    letters = string.ascii_lowercase
    body = ["".join(rng.choices(letters, k=3)) for _ in range(max(0, n - 1))]
    return " ".join([tag, *body])


def _arrivals(rng: random.Random, rate: float, duration_s: float) -> list[float]:
    """Poisson arrival times in [0, duration_s)."""
    times: list[float] = []
    t = rng.expovariate(rate)
    while t < duration_s:
        times.append(t)
        t += rng.expovariate(rate)
    return times


def _jitter(rng: random.Random, mean: int) -> int:
    """A length around `mean` (+-50%), at least 1."""
    return max(1, round(mean * rng.uniform(0.5, 1.5)))


def shared_prompts(spec: SharedSpec, seed: int) -> Workload:
    rng = random.Random(seed)
    systems = [words(rng, spec.system_tokens, f"sys{g}") for g in range(spec.groups)]
    questions = [
        [words(rng, _jitter(rng, spec.question_tokens), f"q{g}x{p}") for p in range(spec.prompts)]
        for g in range(spec.groups)
    ]
    scripts = []
    for t in _arrivals(rng, spec.rate, spec.duration_s):
        g, p = rng.randrange(spec.groups), rng.randrange(spec.prompts)
        scripts.append(Script(t, systems[g], (Turn(questions[g][p], spec.max_tokens),)))
    q_tokens = sum(len(q.split()) for qs in questions for q in qs)
    return Workload(
        name="shared",
        description=(
            f"{spec.groups} system prompts of {spec.system_tokens} tokens x {spec.prompts} "
            f"questions of ~{spec.question_tokens}, Poisson {spec.rate:g} req/s for "
            f"{spec.duration_s:g}s, {spec.max_tokens} output tokens"
        ),
        scripts=tuple(scripts),
        working_set_tokens=spec.groups * spec.system_tokens + q_tokens,
        largest_request_tokens=spec.system_tokens + 2 * spec.question_tokens + spec.max_tokens,
    )


def multiturn_sessions(spec: MultiturnSpec, seed: int) -> Workload:
    rng = random.Random(seed)
    systems = [words(rng, spec.system_tokens, f"chat{s}") for s in range(spec.system_prompts)]
    scripts = []
    spans: list[tuple[float, float, int]] = []  # (start, end, final history tokens)
    t = 0.0
    for n in range(spec.sessions):
        t += rng.expovariate(spec.session_rate)
        turns = []
        for i in range(rng.randint(spec.turns_min, spec.turns_max)):
            think = rng.expovariate(1.0 / spec.think_s) if i else 0.0
            user = words(rng, _jitter(rng, spec.user_tokens), f"s{n}t{i}")
            turns.append(Turn(user, spec.max_tokens, think))
        scripts.append(
            Script(t, systems[rng.randrange(spec.system_prompts)], tuple(turns), f"session-{n}")
        )
        end = t + sum(x.think_s for x in turns) + len(turns) * spec.est_turn_s
        history = sum(len(x.user.split()) + x.max_tokens for x in turns)
        spans.append((t, end, history))
    live = _mean_live_tokens(spans)
    longest = max((h for _, _, h in spans), default=0)
    return Workload(
        name="multiturn",
        description=(
            f"{spec.sessions} sessions starting at {spec.session_rate:g}/s, "
            f"{spec.turns_min}-{spec.turns_max} turns of ~{spec.user_tokens} tokens, "
            f"{spec.system_prompts} system prompts of {spec.system_tokens}, "
            f"{spec.max_tokens} output tokens, think ~{spec.think_s:g}s"
        ),
        scripts=tuple(scripts),
        working_set_tokens=spec.system_prompts * spec.system_tokens + live,
        largest_request_tokens=spec.system_tokens + longest,
    )


def _mean_live_tokens(spans: list[tuple[float, float, int]]) -> int:
    """Time-averaged sum of the histories of sessions alive, over the middle of the run."""
    if not spans:
        return 0
    lo = min(s for s, _, _ in spans)
    hi = max(e for _, e, _ in spans)
    samples = [lo + (hi - lo) * (0.2 + 0.6 * i / 49) for i in range(50)]
    totals = [sum(h for s, e, h in spans if s <= x < e) for x in samples]
    return round(sum(totals) / len(totals))


def mixed(spec: MixedSpec, seed: int) -> Workload:
    base = shared_prompts(spec.shared, seed)
    rng = random.Random(seed + 1)
    unique = [
        Script(t, words(rng, spec.unique_tokens, f"u{i}"), (Turn("go", spec.shared.max_tokens),))
        for i, t in enumerate(_arrivals(rng, spec.unique_rate, spec.shared.duration_s))
    ]
    scripts = sorted([*base.scripts, *unique], key=lambda s: s.start_s)
    return Workload(
        name="mixed",
        description=(
            f"{base.description}; plus unique prompts of {spec.unique_tokens} tokens at "
            f"{spec.unique_rate:g} req/s"
        ),
        scripts=tuple(scripts),
        working_set_tokens=base.working_set_tokens,
        largest_request_tokens=max(base.largest_request_tokens, spec.unique_tokens + 40),
    )


def gpu_blocks_for(workload: Workload, workers: int, fleet_share: float) -> int:
    """Per-worker KV capacity: the fleet holds `fleet_share` of the working set, plus room for
    two of the largest requests running at once, so that admission rarely waits."""
    share = math.ceil(workload.working_set_blocks * fleet_share / workers)
    running = 2 * math.ceil(workload.largest_request_tokens / BLOCK_TOKENS)
    return share + running
