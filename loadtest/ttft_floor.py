"""The TTFT no router can beat: each request alone on an idle simulated worker that holds every
block ever computed (the intrinsic reuse), so it prefills only what was never seen before.

The simulated worker's step model (workers/sim/engine.py) gives that time exactly: the uncached
tokens are prefilled in chunks of `max_num_batched_tokens`, each step costing `step_overhead_s`
plus `prefill_s_per_token` per token, and the first token comes with the last prefill step (a
fully cached prompt still computes its last token). A router's TTFT above this floor is queueing
and lost cache hits; a target below it cannot be met by any placement.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from workers.sim.config import SimConfig


def idle_ttft_s(uncached_tokens: int, config: SimConfig) -> float:
    tokens = max(1, uncached_tokens)
    steps = math.ceil(tokens / config.max_num_batched_tokens)
    return (steps * config.step_overhead_s + tokens * config.prefill_s_per_token) * (
        config.time_scale
    )


def ttft_floors_s(intrinsic: Sequence[tuple[int, int]], config: SimConfig) -> list[float]:
    """Each request's floor, from its (hit tokens, prompt tokens) in an unbounded cache
    (`intrinsic.pooled_hits` with no capacity limit), in arrival order."""
    return [idle_ttft_s(prompt - hit, config) for hit, prompt in intrinsic]
