"""What hybrid learns from answers: characters per token, evictions, capacity, rates, answers."""

from __future__ import annotations

import random

import pytest

from router.config import HybridPolicy, IndexConfig
from router.domain.calibration import TokenCalibration
from router.domain.policy import Outcome, RoutingRequest
from router.domain.worker import Health, Worker
from router.routing.hybrid import HybridCost
from router.routing.key import extend_key, routing_key
from router.routing.prefix_index import PrefixIndex
from router.routing.rates import LearnedRates
from router.routing.recent_load import RecentLoad
from router.upstream.answer import AnswerBytes, answer_of


def workers(n: int) -> list[Worker]:
    return [
        Worker(id=f"w{i}", url=f"http://w{i}", pool="p", health=Health.HEALTHY) for i in range(n)
    ]


def text(rng: random.Random, words: int, letters: int = 3) -> str:
    return " ".join("".join(rng.choices("abcdefgh", k=letters)) for _ in range(words))


def request(policy: HybridCost, key: str) -> RoutingRequest:
    tokens = policy.index.calibration.estimate_tokens(key)
    return RoutingRequest(model="m", key=key, prompt_tokens=tokens, max_tokens=8)


def answered(policy: HybridCost, r: RoutingRequest, ws: list[Worker]) -> None:
    """`r` routed and answered, with nothing of it cached before."""
    decision = policy.pick(r, ws)
    policy.observe(Outcome(r, decision, ok=True, prompt_tokens=r.prompt_tokens, cached_tokens=0))


def test_calibration_learns_characters_per_token_and_bumps_version() -> None:
    calibration = TokenCalibration()
    key = "x" * 1200
    for _ in range(40):
        calibration.observe(key, 100)  # 12 characters per token
    assert calibration.chars_per_token == pytest.approx(12, rel=0.05)
    assert calibration.estimate_tokens(key) == pytest.approx(100, rel=0.05)
    assert calibration.version > 0
    before = calibration.chars_per_token
    calibration.observe(key, 3)  # too short to say anything
    calibration.observe("", 500)
    assert calibration.chars_per_token == before


def test_index_budget_follows_calibrated_characters_per_token() -> None:
    calibration = TokenCalibration()
    index = PrefixIndex(IndexConfig(), calibration)
    worker = workers(1)[0]
    worker.kv_capacity_blocks = 1000  # 16,000 tokens
    index.sync_capacities([worker])
    assert index.budget_of("w0") == 16000 * 4 // 64
    for _ in range(60):
        calibration.observe("y" * 1200, 100)
    index.sync_capacities([worker])
    assert index.budget_of("w0") == pytest.approx(16000 * 12 / 64, rel=0.05)


def test_fewer_cached_tokens_than_predicted_drops_what_the_worker_evicted() -> None:
    rng = random.Random(3)
    policy = HybridCost(HybridPolicy(), IndexConfig(), random.Random(1))
    ws = workers(1)
    old = [request(policy, text(rng, 400)) for _ in range(3)]
    for r in old:
        answered(policy, r, ws)
    probe = old[1]
    decision = policy.pick(probe, ws)
    assert decision.matched_tokens > 300
    # The worker says it held nothing: it evicted this prompt, and so the one used before it.
    policy.observe(Outcome(probe, decision, ok=True, prompt_tokens=400, cached_tokens=0))
    index = policy.index
    assert not index.match(index.block_keys(old[0].key))
    assert index.match(index.block_keys(old[2].key))  # used after the evicted one: kept
    assert index.match(index.block_keys(probe.key))  # just computed again: held now
    assert policy.feedback.evictions_seen == 1


def test_a_prefix_still_being_computed_is_no_eviction() -> None:
    """A request matching a prefix that an earlier pick indexed, before that pick's answer
    came, may find it not computed yet: its shortfall in cached tokens drops nothing (taken
    for an eviction, it erased everything older the worker held). Once the prefix was
    answered, a shortfall is an eviction again."""
    rng = random.Random(4)
    policy = HybridCost(HybridPolicy(), IndexConfig(), random.Random(1))
    ws = workers(1)
    index = policy.index
    older = request(policy, text(rng, 400))
    answered(policy, older, ws)
    first = request(policy, text(rng, 400))
    computing = policy.pick(first, ws)  # its answer has not come
    again = policy.pick(first, ws)
    assert again.matched_tokens > 300 and again.matched_pending
    policy.observe(Outcome(first, again, ok=True, prompt_tokens=400, cached_tokens=0))
    assert index.match(index.block_keys(older.key))  # nothing dropped
    assert policy.feedback.evictions_seen == 0
    policy.observe(Outcome(first, computing, ok=True, prompt_tokens=400, cached_tokens=0))
    late = policy.pick(first, ws)
    assert not late.matched_pending
    policy.observe(Outcome(first, late, ok=True, prompt_tokens=400, cached_tokens=0))
    assert not index.match(index.block_keys(older.key))  # used before the evicted one
    assert policy.feedback.evictions_seen == 1


def test_a_prompt_the_worker_refused_is_not_left_in_the_index() -> None:
    """A pick indexes the prompt for its worker at once, without making room for it; when the
    worker refuses it (too long for the model, say) or fails before answering, that insert is
    undone, and only that: what the worker held before stays. A stream that broke after its
    first byte was computed; an answered prompt makes room, evicting what is least recent."""
    for backend in ("flat", "pygtrie"):
        rng = random.Random(6)
        policy = HybridCost(HybridPolicy(), IndexConfig(backend=backend), random.Random(1))
        ws = workers(1)
        index = policy.index
        older = request(policy, text(rng, 300))
        policy.pick(older, ws)
        shared = text(rng, 300)
        held = request(policy, shared)
        policy.pick(held, ws)
        used = index.blocks_of("w0")
        index.set_capacity("w0", used + 10)  # no room for another prompt
        refused = request(policy, shared + " " + text(rng, 2000))
        decision = policy.pick(refused, ws)
        assert decision.held_keys > 0 and index.blocks_of("w0") > used
        policy.observe(Outcome(refused, decision, ok=False, unanswered=True))
        assert index.blocks_of("w0") == used
        assert index.match(index.block_keys(refused.key)) == index.match(index.block_keys(held.key))
        assert index.match(index.block_keys(held.key))  # held before the refused pick: kept
        assert index.match(index.block_keys(older.key))  # and not pushed out by it
        broke = request(policy, shared + " " + text(rng, 2000))
        decision = policy.pick(broke, ws)
        policy.observe(Outcome(broke, decision, ok=False))  # after its first byte
        assert index.blocks_of("w0") > used
        # Answered: now the worker is known to hold it, and the index fits its budget.
        answered = request(policy, text(rng, 2000))
        decision = policy.pick(answered, ws)
        policy.observe(Outcome(answered, decision, ok=True, prompt_tokens=2000, cached_tokens=0))
        assert index.blocks_of("w0") <= used + 10


def _one_shortfall(rng: random.Random, prompts: int) -> tuple[HybridCost, list[Worker]]:
    """A worker of unreported capacity given `prompts` prompts, then one answer for the first
    of them again that reports nothing cached."""
    policy = HybridCost(HybridPolicy(), IndexConfig(default_capacity_blocks=50_000))
    ws = workers(1)
    sent = [request(policy, text(rng, 400)) for _ in range(prompts)]
    for r in sent:
        answered(policy, r, ws)
    decision = policy.pick(sent[0], ws)
    policy.observe(Outcome(sent[0], decision, ok=True, prompt_tokens=400, cached_tokens=0))
    return policy, ws


def test_one_shortfall_at_most_halves_an_unreported_capacity() -> None:
    """Early on the index lists a fraction of what the worker holds, and a prefix still being
    computed reads as evicted: one such answer must not shrink the budget to what is listed."""
    policy, _ = _one_shortfall(random.Random(5), prompts=3)
    assert policy.index.blocks_of("w0") < 1_000
    assert policy.index.budget_of("w0") == 25_000


def test_unreported_capacity_is_learned_from_cached_tokens() -> None:
    rng = random.Random(4)
    policy, ws = _one_shortfall(rng, prompts=6)
    shrunk = policy.index.budget_of("w0")
    assert shrunk < 50_000
    # Later the worker holds a prompt the index had already let go of: the budget grows.
    fresh = request(policy, text(rng, 2000))
    decision = policy.pick(fresh, ws)
    decision.matched_tokens = 0
    policy.observe(Outcome(fresh, decision, ok=True, prompt_tokens=2000, cached_tokens=1600))
    assert policy.index.budget_of("w0") > shrunk


def test_null_cached_tokens_count_only_after_the_worker_reported_numbers() -> None:
    rng = random.Random(5)
    policy = HybridCost(HybridPolicy(), IndexConfig())
    ws = workers(1)
    r = request(policy, text(rng, 400))
    first = policy.pick(r, ws)
    policy.observe(Outcome(r, first, ok=True, prompt_tokens=400, cached_tokens=None))
    decision = policy.pick(r, ws)
    policy.observe(Outcome(r, decision, ok=True, prompt_tokens=400, cached_tokens=None))
    assert policy.feedback.evictions_seen == 0  # null from a worker that never sent a number
    policy.observe(Outcome(r, decision, ok=True, prompt_tokens=400, cached_tokens=384))
    policy.observe(Outcome(r, decision, ok=True, prompt_tokens=400, cached_tokens=None))
    assert policy.feedback.evictions_seen == 1  # now null means 0


def test_answer_is_indexed_so_the_next_turn_matches_its_whole_history() -> None:
    rng = random.Random(6)
    policy = HybridCost(HybridPolicy(), IndexConfig(), random.Random(1))
    ws = workers(4)
    messages = [{"role": "system", "content": text(rng, 300)}, {"role": "user", "content": "hi"}]
    first = request(policy, routing_key({"messages": messages}, "chat"))
    decision = policy.pick(first, ws)
    answer = text(rng, 300)
    answer_key = extend_key(first.key, answer, chat=True)
    policy.observe(Outcome(first, decision, ok=True, answer_key=answer_key))
    turn2 = [*messages, {"role": "assistant", "content": answer}, {"role": "user", "content": "?"}]
    second_key = routing_key({"messages": turn2}, "chat")
    assert second_key.startswith(answer_key)
    held = policy.index.match(policy.index.block_keys(second_key))
    assert held[decision.worker.id] * 64 > len(first.key) + 0.9 * len(answer)


def test_learned_rates_recover_a_workers_prefill_rate_and_decode_cost() -> None:
    rates = LearnedRates(prior_rate=20_000, prior_decode_s=0.002, prior_weight=4)
    rng = random.Random(7)
    for _ in range(256):
        tokens, running = rng.randrange(100, 4000), rng.randrange(0, 30)
        ttft = 0.01 + tokens / 5000 + running * 0.004
        if rng.random() < 0.05:
            ttft += 2.0  # a stall: must not move the fit
        rates.observe("w", tokens, running, ttft)
    assert rates.rate("w") == pytest.approx(5000, rel=0.1)
    assert rates.decode_s("w") == pytest.approx(0.004, rel=0.2)
    assert rates.rate("other") == rates.rate("w")  # a new worker starts from the pool's


def test_answer_text_from_events_and_bodies() -> None:
    answer = AnswerBytes(chat=True)
    answer.add(b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n')
    answer.add(b'data: {"choices":[{"delta":{"reasoning_content":"hmm"}}]}\n\n')
    # The relay hands over blocks of whole events.
    answer.add(b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n')
    answer.add(b'data: {"choices":[{"delta":{"content":"lo \\"you\\"\\n\\u00e9"}}]}\n\n')
    answer.add(b"data: [DONE]\n\n")
    assert answer.text() == 'Hello "you"\n\u00e9'
    assert answer.tokens == 2  # the role chunk's empty content is no token
    completions = AnswerBytes(chat=False)
    completions.add(b'data: {"choices":[{"text":"a b","index":0}]}\n\n')
    completions.add(b'data: {"choices":[{"text":"\\\\ c\\"","index":0}]}\n\n')
    assert completions.text() == 'a b\\ c"'
    assert answer_of({"choices": [{"message": {"content": "x"}}]}) == "x"
    assert answer_of({"choices": [{"text": "y"}]}) == "y"
    assert answer_of({"choices": []}) is None
    huge = AnswerBytes(chat=True)
    for _ in range(100):
        huge.add(b'data: {"choices":[{"delta":{"content":"' + b"x" * 4096 + b'"}}]}\n\n')
    assert huge.text() is None  # over the bound: not indexed, and not kept
    assert huge.tokens == 100  # but still counted, for a migration's token limits


def test_other_replicas_load_from_worker_reports_steers_new_prompts() -> None:
    from router.domain.worker import ReportedLoad

    ws = workers(2)
    ws[0].in_flight = 1
    ws[0].take_report(ReportedLoad(running=9, waiting=2), shared_fleet=True)
    ws[1].take_report(ReportedLoad(running=1), shared_fleet=True)
    assert ws[0].peer_in_flight == 10 and ws[1].peer_in_flight == 1
    alone = workers(1)[0]
    alone.take_report(ReportedLoad(running=9), shared_fleet=False)
    assert alone.peer_in_flight == 0  # nobody else sends it work
    policy = HybridCost(HybridPolicy(), IndexConfig(), random.Random(1))
    prompt = request(policy, text(random.Random(8), 200))
    policy.pick(prompt, ws[:1])  # w0 holds the prompt
    peers, ws[0].peer_in_flight = ws[0].peer_in_flight, 0
    ws[0].reported.running = 1
    assert policy.pick(prompt, ws).worker.id == "w0"  # alone, this replica sees w0 nearly idle
    # Other replicas keep w0 busy: copying the prompt to w1 beats queueing behind them.
    ws[0].peer_in_flight = peers
    assert policy.pick(prompt, ws).worker.id == "w1"


def test_identical_workers_share_the_pools_rates_and_a_slow_one_keeps_its_own() -> None:
    rates = LearnedRates(prior_rate=20_000, prior_decode_s=0.002, prior_weight=4)
    rng = random.Random(9)
    for n in range(600):
        worker = f"w{n % 3}"
        per_token = 1 / 10_000 if worker != "w2" else 1 / 3000
        tokens = rng.randrange(100, 4000)
        noise = rng.uniform(0.9, 1.1)  # fits of identical workers differ a little
        rates.observe(worker, tokens, 0, (0.01 + tokens * per_token) * noise)
    assert rates.rate("w0") == rates.rate("w1")  # noise must not tell them apart
    assert rates.rate("w2") == pytest.approx(3000, rel=0.2)  # its own, blended with the prior


def clocked_policy(clock: list[float]) -> HybridCost:
    """A hybrid policy whose recent-load clock reads `clock[0]`."""
    policy = HybridCost(HybridPolicy(), IndexConfig(), random.Random(1))
    policy.recent = RecentLoad(10.0, clock=lambda: clock[0])
    return policy


def test_new_sessions_go_where_little_work_was_placed_lately() -> None:
    clock = [0.0]
    policy = clocked_policy(clock)
    ws = workers(2)
    rng = random.Random(10)
    system = text(rng, 200)
    # w0 was given 20 requests a moment ago, all finished: nothing is in flight anywhere.
    for _ in range(20):
        policy.pick(request(policy, system + text(rng, 50)), ws[:1])
    clock[0] = 1.0
    # w0 holds the system prompt (a few ms of prefill saved), but the work placed there lately
    # outweighs it: the new session's later turns go where they spread the load.
    first_turn = request(policy, system + text(rng, 50))
    first_turn.session_id = "s1"
    assert policy.pick(first_turn, ws).worker.id == "w1"
    # A session already placed stays put: recent load only prices placements.
    second_turn = request(policy, first_turn.key + text(rng, 20))
    second_turn.session_id = "s1"
    for _ in range(20):
        policy.recent.add("w1", clock[0])
    assert policy.pick(second_turn, ws).worker.id == "w1"
    # Long ago is forgotten.
    clock[0] = 1000.0
    assert policy.recent.value("w0", clock[0]) < 1e-6


def test_other_replicas_decisions_count_as_placed_load() -> None:
    clock = [0.0]
    policy = clocked_policy(clock)
    ws = workers(2)
    rng = random.Random(13)
    system = text(rng, 200)
    keys = policy.index.block_keys(system)
    # Another replica sent 20 requests with this prefix to w0: w0 holds it and is loaded.
    for _ in range(20):
        policy.apply_remote_insert("w0", keys)
    assert policy.index.match(keys)["w0"] > 0
    first_turn = request(policy, system + text(rng, 50))
    first_turn.session_id = "s"
    assert policy.pick(first_turn, ws).worker.id == "w1"


def test_a_long_prefix_held_once_is_not_copied_for_a_small_wait() -> None:
    """The worker holding a long history is a little slower right now: copying the history to
    an idle worker would compute it twice and push out what that worker holds. Unless the
    prefix is held twice already (a shared one, whose copies spread its load) or the request
    belongs to a session (its first turn places the rest: spreading keeps its weight)."""

    def chosen(copy_weight: float, holders: int, session: str | None = None) -> str:
        rng = random.Random(8)
        policy = HybridCost(HybridPolicy(copy_weight=copy_weight), IndexConfig(), rng)
        ws = workers(3)
        history = text(rng, 4000)
        for worker in ws[:holders]:
            policy.index.insert(worker.id, policy.index.block_keys(history))
            worker.prefill_backlog_tokens = 7000  # its queue: 0.35 s at the prior rate
        for worker in ws[holders:-1]:
            worker.prefill_backlog_tokens = 100_000  # out of the running
        turn = request(policy, history + " " + text(rng, 50))
        turn.session_id = session
        return policy.pick(turn, ws).worker.id

    # The idle w2 is 0.15 s sooner (beyond the affinity margin) by TTFT alone: copied there.
    assert chosen(copy_weight=0.0, holders=1) == "w2"
    assert chosen(copy_weight=1.0, holders=1) == "w0"
    assert chosen(copy_weight=1.0, holders=2) == "w2"
    assert chosen(copy_weight=1.0, holders=1, session="s") == "w2"


def test_prefill_another_replica_sent_queues_ahead_and_drains_at_the_workers_rate() -> None:
    """Another replica's decision says it sent a worker 20k tokens to compute: this replica's
    next cold prompt goes elsewhere, and once the worker had the time to compute them (at its
    prefill rate) that worker counts as free again."""
    clock = [0.0]
    policy = clocked_policy(clock)
    ws = workers(2)
    rng = random.Random(14)
    policy.apply_remote_insert("w0", policy.index.block_keys(text(rng, 100)), 20_000)
    policy.apply_remote_insert("w1", policy.index.block_keys(text(rng, 100)))  # an answer's
    assert policy.peer_backlog.tokens("w0", clock[0], 20_000.0) == 20_000
    cold = [request(policy, text(rng, 300)) for _ in range(3)]
    assert policy.pick(cold[0], ws).worker.id == "w1"
    clock[0] = 0.5  # half of it computed at the prior rate (20k tokens/s)
    assert policy.peer_backlog.tokens("w0", clock[0], 20_000.0) == 10_000
    clock[0] = 1.5
    assert policy.peer_backlog.tokens("w0", clock[0], 20_000.0) == 0
    assert not policy.peer_backlog  # behind one replica again: nothing to add per pick
    assert policy.pick(cold[1], ws).worker.id == "w0"  # w1 has this replica's first request
