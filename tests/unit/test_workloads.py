"""The policy benchmark's pure parts: seeded workloads, KV sizing and the intrinsic reuse bound."""

from __future__ import annotations

import random

from loadtest.intrinsic import ChatTokens, block_chain, intrinsic_reuse
from loadtest.workloads import (
    MixedSpec,
    MultiturnSpec,
    SharedSpec,
    gpu_blocks_for,
    mixed,
    multiturn_sessions,
    shared_prompts,
    words,
)

SMALL_SHARED = SharedSpec(groups=4, prompts=3, system_tokens=200, rate=20.0, duration_s=5.0)
SMALL_CHAT = MultiturnSpec(sessions=12, session_rate=4.0, system_tokens=100, user_tokens=20)


def test_workloads_are_reproducible_from_their_seed() -> None:
    assert shared_prompts(SMALL_SHARED, 3) == shared_prompts(SMALL_SHARED, 3)
    assert multiturn_sessions(SMALL_CHAT, 3) == multiturn_sessions(SMALL_CHAT, 3)
    assert shared_prompts(SMALL_SHARED, 3) != shared_prompts(SMALL_SHARED, 4)


def test_words_count_one_token_each_and_start_with_their_tag() -> None:
    text = words(random.Random(1), 50, "tagged")
    assert len(text.split()) == 50
    assert text.split()[0] == "tagged"
    # Three letters and a space: the gateway's four-characters-per-token estimate holds.
    assert abs(len(text) / 50 - 4) < 0.2


def test_shared_requests_use_the_groups_system_prompts_and_poisson_arrivals() -> None:
    w = shared_prompts(SMALL_SHARED, 1)
    systems = {s.system for s in w.scripts}
    assert len(systems) <= SMALL_SHARED.groups
    assert all(len(s.turns) == 1 and s.session_id is None for s in w.scripts)
    starts = [s.start_s for s in w.scripts]
    assert starts == sorted(starts) and all(0 <= t < SMALL_SHARED.duration_s for t in starts)
    # About rate x duration requests (a generous band: it is a seeded Poisson draw).
    assert 50 <= w.requests <= 150
    assert w.working_set_tokens >= SMALL_SHARED.groups * SMALL_SHARED.system_tokens


def test_sessions_have_ids_several_turns_and_think_times() -> None:
    w = multiturn_sessions(SMALL_CHAT, 2)
    assert len(w.scripts) == SMALL_CHAT.sessions
    assert len({s.session_id for s in w.scripts}) == SMALL_CHAT.sessions
    for s in w.scripts:
        assert SMALL_CHAT.turns_min <= len(s.turns) <= SMALL_CHAT.turns_max
        assert s.turns[0].think_s == 0 and all(t.think_s > 0 for t in s.turns[1:])
    assert len({s.system for s in w.scripts}) <= SMALL_CHAT.system_prompts


def test_mixed_adds_unique_prompts_to_the_shared_ones() -> None:
    spec = MixedSpec(shared=SMALL_SHARED, unique_rate=5.0, unique_tokens=300)
    w = mixed(spec, 1)
    unique = [s for s in w.scripts if s.system.startswith("u")]
    assert unique and len({s.system for s in unique}) == len(unique)
    assert w.requests == shared_prompts(SMALL_SHARED, 1).requests + len(unique)


def test_kv_sizing_puts_the_working_set_beyond_one_worker() -> None:
    w = shared_prompts(SharedSpec(), 1)
    blocks = gpu_blocks_for(w, workers=8, fleet_share=1.0)
    assert blocks < w.working_set_blocks < 8 * blocks


def test_block_chain_counts_whole_blocks_and_chains_prefixes() -> None:
    a = list(range(40))
    assert len(block_chain(a)) == 2
    b = list(range(32)) + [99] * 8
    assert block_chain(a)[:2] == block_chain(b)[:2]
    c = [7, *range(1, 40)]
    assert block_chain(c)[1] != block_chain(a)[1]  # the second block differs through its parent


def test_intrinsic_reuse_counts_like_vllm() -> None:
    prompt = list(range(48))
    # First sight: nothing. Repeat: at most (48 - 1) // 16 = 2 blocks, never the last token's.
    assert intrinsic_reuse([(prompt, [1])]) == (0, 48)
    assert intrinsic_reuse([(prompt, [1]), (prompt, [1])]) == (32, 96)
    # Generated tokens whose KV was computed (all but the last) are cached too.
    answer = list(range(100, 117))  # 17 tokens: 16 computed, one whole block with the prompt
    follow = prompt + answer[:16] + [5] * 20
    hits, _ = intrinsic_reuse([(prompt, answer), (follow, [1])])
    assert hits == 64


def test_chat_tokens_extend_across_turns() -> None:
    tokens = ChatTokens()
    first = [{"role": "system", "content": "sys words"}, {"role": "user", "content": "hi"}]
    answer = " the of and"
    second = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "x"}]
    head = tokens.prompt(first) + tokens.answer(answer)
    assert tokens.prompt(second)[: len(head)] == head
