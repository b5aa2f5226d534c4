"""The TTFT floor the routing benchmark prints: the simulated worker's step model for a request
alone on an idle worker that has seen every earlier prompt."""

from __future__ import annotations

import sys

import pytest

from loadtest.intrinsic import pooled_hits
from loadtest.ttft_floor import idle_ttft_s, ttft_floors_s
from workers.sim.config import SimConfig

CONFIG = SimConfig(model="m", max_num_batched_tokens=4096)


def test_a_long_prompt_pays_one_step_overhead_per_chunk() -> None:
    one_chunk = CONFIG.step_overhead_s + 4096 * CONFIG.prefill_s_per_token
    assert idle_ttft_s(4096, CONFIG) == pytest.approx(one_chunk)
    two_chunks = 2 * CONFIG.step_overhead_s + 4097 * CONFIG.prefill_s_per_token
    assert idle_ttft_s(4097, CONFIG) == pytest.approx(two_chunks)


def test_a_fully_cached_prompt_still_computes_its_last_token() -> None:
    assert idle_ttft_s(0, CONFIG) == idle_ttft_s(1, CONFIG) > CONFIG.step_overhead_s


def test_a_repeated_prompt_prefills_only_what_was_never_seen() -> None:
    prompt = list(range(160))
    first, again = ttft_floors_s(pooled_hits([(prompt, [1]), (prompt, [1])], sys.maxsize), CONFIG)
    assert first == pytest.approx(idle_ttft_s(160, CONFIG))
    # 9 of its 10 blocks were seen (the last token is always computed): 16 tokens left.
    assert again == pytest.approx(idle_ttft_s(16, CONFIG))
