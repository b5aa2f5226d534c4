from __future__ import annotations

import random
from collections import Counter

from router.config import (
    ConsistentHashPolicy,
    HybridPolicy,
    IndexConfig,
    LeastLoadPolicy,
    PrefixPolicy,
    RoundRobinPolicy,
)
from router.domain.policy import RoutingRequest
from router.domain.worker import Health, Worker
from router.routing.consistent_hash import ConsistentHash
from router.routing.factory import build_policy
from router.routing.hybrid import HybridCost
from router.routing.key import estimate_prompt_tokens
from router.routing.least_load import LeastLoad
from router.routing.prefix import PrefixAffinity
from router.routing.sessions import SessionTable

INDEX = IndexConfig()


def workers(n: int = 4) -> list[Worker]:
    return [
        Worker(id=f"w{i}", url=f"http://w{i}", pool="p", health=Health.HEALTHY) for i in range(n)
    ]


def req(key: str, session_id: str | None = None) -> RoutingRequest:
    return RoutingRequest(
        model="m",
        key=key,
        prompt_tokens=estimate_prompt_tokens(key),
        max_tokens=16,
        session_id=session_id,
    )


def prompt(rng: random.Random, chars: int) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(chars))


# -- least_load ----------------------------------------------------------------------------


def test_least_load_picks_idle_worker() -> None:
    ws = workers()
    for w in ws:
        w.in_flight = 3
    ws[2].in_flight = 0
    ws[1].in_flight = 0
    ws[1].reported.waiting = 2
    policy = LeastLoad(random.Random(1))
    assert {policy.pick(req("x"), ws).worker.id for _ in range(20)} == {"w2"}


def test_least_load_spreads_ties_over_all_workers() -> None:
    ws = workers()
    policy = LeastLoad(random.Random(1))
    seen = Counter(policy.pick(req("x"), ws).worker.id for _ in range(200))
    assert set(seen) == {w.id for w in ws}


# -- consistent_hash -----------------------------------------------------------------------


def test_consistent_hash_keeps_session_and_spills_when_overloaded() -> None:
    ws = workers()
    policy = ConsistentHash(ConsistentHashPolicy(), INDEX)
    first = policy.pick(req("a", session_id="s1"), ws)
    assert first.reason == "hash_ring"
    for i in range(10):
        assert policy.pick(req(f"other {i}", session_id="s1"), ws).worker is first.worker
    first.worker.in_flight = 20
    spilled = policy.pick(req("a", session_id="s1"), ws)
    assert spilled.worker is not first.worker and spilled.reason == "spill"
    # Without a session the key's first block is the affinity: same system prompt, same worker.
    base = "system prompt " * 10
    picks = {policy.pick(req(base + f"user {i}"), workers()).worker.id for i in range(10)}
    assert len(picks) == 1


def test_consistent_hash_spreads_sessions() -> None:
    policy = ConsistentHash(ConsistentHashPolicy(), INDEX)
    ws = workers()
    seen = {policy.pick(req("x", session_id=f"s{i}"), ws).worker.id for i in range(200)}
    assert seen == {w.id for w in ws}


# -- prefix (SGLang baseline) --------------------------------------------------------------


def test_prefix_follows_match_and_falls_back_under_imbalance() -> None:
    rng = random.Random(2)
    ws = workers()
    policy = PrefixAffinity(PrefixPolicy(), INDEX, random.Random(3))
    doc = prompt(rng, 4000)
    first = policy.pick(req(doc), ws)
    assert first.reason == "least_load"
    again = policy.pick(req(doc + " follow-up question"), ws)
    assert again.worker is first.worker and again.reason == "prefix_hit"
    assert again.matched_tokens > 900
    # Moderate load on the holder stays below the gate: affinity holds.
    first.worker.in_flight = 20
    assert policy.pick(req(doc + " more"), ws).worker is first.worker
    # Past the absolute and relative thresholds the gate fires: least loaded, affinity lost.
    first.worker.in_flight = 40
    gated = policy.pick(req(doc + " more"), ws)
    assert gated.worker is not first.worker and gated.reason == "imbalance"


def test_prefix_low_match_goes_least_loaded() -> None:
    ws = workers()
    policy = PrefixAffinity(PrefixPolicy(), INDEX, random.Random(3))
    rng = random.Random(4)
    shared = prompt(rng, 200)
    holder = policy.pick(req(shared + prompt(rng, 2000)), ws).worker
    holder.in_flight = 1
    d = policy.pick(req(shared + prompt(rng, 2000)), ws)  # ~10% match < 0.5 threshold
    assert d.reason == "least_load" and d.worker is not holder


# -- hybrid --------------------------------------------------------------------------------


def hybrid(seed: int = 5, **kw: float) -> HybridCost:
    return HybridCost(HybridPolicy(**kw), INDEX, random.Random(seed))


def test_hybrid_prefers_cached_prefix() -> None:
    ws = workers()
    policy = hybrid()
    doc = prompt(random.Random(6), 8000)
    first = policy.pick(req(doc), ws)
    assert first.reason == "cold"
    for i in range(5):
        d = policy.pick(req(doc + f" question {i}"), ws)
        assert d.worker is first.worker and d.reason == "prefix_hit"
        assert d.matched_tokens >= 1900


def test_hybrid_leaves_cached_worker_when_its_backlog_is_slower() -> None:
    ws = workers()
    policy = hybrid()
    doc = prompt(random.Random(7), 8000)
    holder = policy.pick(req(doc), ws).worker
    # A small backlog is still worth waiting behind: 2000 cached tokens save ~0.1 s.
    holder.prefill_backlog_tokens = 200
    holder.in_flight = 1
    d = policy.pick(req(doc + " again"), ws)
    assert d.worker is holder and d.reason == "prefix_hit"
    # A 1 s prefill backlog makes the holder the slower choice.
    holder.prefill_backlog_tokens = 20_000
    holder.in_flight = 4
    d = policy.pick(req(doc + " next"), ws)
    assert d.worker is not holder and d.reason == "spill" and d.matched_tokens == 0


def test_hybrid_session_sticky_within_margin() -> None:
    ws = workers()
    policy = hybrid(session_margin_s=0.05)
    rng = random.Random(8)
    first = policy.pick(req(prompt(rng, 400), session_id="s"), ws)
    # Unrelated prompt, the session's worker slightly busier than the rest: still sticky.
    first.worker.prefill_backlog_tokens = 400  # +0.02 s
    d = policy.pick(req(prompt(rng, 400), session_id="s"), ws)
    assert d.worker is first.worker and d.reason == "sticky"
    # Beyond the margin the session moves, and then sticks to its new worker.
    first.worker.prefill_backlog_tokens = 20_000  # +1 s
    moved = policy.pick(req(prompt(rng, 400), session_id="s"), ws)
    assert moved.worker is not first.worker
    assert policy.pick(req(prompt(rng, 400), session_id="s"), ws).worker is moved.worker


def test_hybrid_default_keeps_a_session_whose_worker_looks_busy_through_peer_reports() -> None:
    """Behind several replicas, a session's worker carries the others' requests as of its last
    load report: a few more than this replica sends must not move the session off its cached
    history (at a 0.05 s margin it moved; replicas then lost a point of hit rate)."""
    ws = workers()
    policy = hybrid()
    rng = random.Random(11)
    history = prompt(rng, 400)
    first = policy.pick(req(history, session_id="s"), ws)
    first.worker.peer_in_flight = 3  # three requests of other replicas, by its last report
    d = policy.pick(req(history + " " + prompt(rng, 200), session_id="s"), ws)
    assert d.worker is first.worker and d.reason == "sticky"


def test_hybrid_spreads_distinct_cold_prompts_over_all_workers() -> None:
    ws = workers(8)
    policy = hybrid()
    rng = random.Random(9)
    seen = Counter(policy.pick(req(prompt(rng, 600)), ws).worker.id for _ in range(200))
    assert set(seen) == {w.id for w in ws}
    assert max(seen.values()) < 60


def test_hybrid_forget_worker_purges_index_and_sessions() -> None:
    ws = workers()
    policy = hybrid()
    doc = prompt(random.Random(10), 2000)
    chosen = policy.pick(req(doc, session_id="s"), ws).worker
    policy.forget_worker(chosen)
    rest = [w for w in ws if w is not chosen]
    assert policy.index.match(policy.index.block_keys(doc)) == {}
    assert policy.sessions.get("s") is None
    assert policy.pick(req(doc, session_id="s"), rest).reason == "cold"


def test_sessions_bounded_and_expire() -> None:
    now = [0.0]
    table = SessionTable(max_entries=2, ttl_s=10, clock=lambda: now[0])
    table.put("a", "w1")
    table.put("b", "w2")
    table.get("a")
    table.put("c", "w3")
    assert len(table) == 2 and table.get("a") == "w1" and table.get("b") is None
    now[0] = 11
    assert table.get("a") is None


def test_factory_builds_each_policy() -> None:
    rng = random.Random(0)
    names = {
        build_policy("p", cfg, INDEX, rng).name
        for cfg in (
            RoundRobinPolicy(),
            LeastLoadPolicy(),
            ConsistentHashPolicy(),
            PrefixPolicy(),
            HybridPolicy(),
        )
    }
    assert names == {"round_robin", "least_load", "consistent_hash", "prefix", "hybrid"}


def test_hybrid_keeps_a_sessionless_near_tie_on_the_prefix_holder() -> None:
    from router.config import HybridPolicy, IndexConfig
    from router.domain.policy import RoutingRequest
    from router.domain.worker import Health, Worker
    from router.routing.hybrid import HybridCost

    policy = HybridCost(HybridPolicy(), IndexConfig(), rng=random.Random(3))
    workers = [
        Worker(id=f"w{i}", url=f"http://w{i}", pool="m", health=Health.HEALTHY) for i in range(3)
    ]
    key = "system prompt shared by many requests " * 60
    first = policy.pick(RoutingRequest("m", key, len(key) // 4, 16), workers)
    holder = first.worker
    # The holder is still computing that prefix for the first request: by the estimate alone a
    # cold worker is about as fast, but it would make a second copy of the prefix.
    holder.in_flight, holder.prefill_backlog_tokens = 1, len(key) // 4
    follow = policy.pick(
        RoutingRequest("m", key + " and a question", len(key) // 4 + 4, 16), workers
    )
    assert follow.worker is holder and follow.reason == "prefix_hit"
    # With a session the request places its later turns too: the faster cold worker wins.
    with_session = RoutingRequest("m", key + " q", len(key) // 4 + 4, 16, session_id="s1")
    assert policy.pick(with_session, workers).worker is not holder


def test_hybrid_prefers_a_worker_running_the_adapter_then_one_with_a_free_slot() -> None:
    from router.domain.worker import ReportedLoad

    ws = workers(3)
    full, room, active = ws
    full.reported = ReportedLoad(lora_running=frozenset({"a", "b"}), max_lora=2)
    room.reported = ReportedLoad(lora_running=frozenset({"a"}), max_lora=2)
    active.reported = ReportedLoad(lora_waiting=frozenset({"sql"}), max_lora=2)
    assert [w.adapter_state("sql") for w in ws] == ["full", "room", "active"]
    policy = hybrid()
    request = req("a cold prompt " * 20)
    request.adapter = "sql"
    assert policy.pick(request, ws).worker is active
    assert policy.pick(request, [full, room]).worker is room
    request.adapter = None  # the base model: no adapter cost anywhere
    assert {policy.pick(req(f"cold {i} " * 30), [full, room]).worker for i in range(12)} == {
        full,
        room,
    }
