"""The `/stats` accumulator and the seed API's stream rewriting, driven by a fake clock."""

from __future__ import annotations

import json

from router.http.seed import SeedEvents
from router.stats import MAX_WORKER_TALLIES, PoolFacts, Stats, format_uptime
from router.upstream.sse import Usage


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_uptime_format() -> None:
    assert format_uptime(0) == "0 days, 0 hours, 0 minutes"
    assert format_uptime(2 * 86400 + 14 * 3600 + 32 * 60 + 59) == "2 days, 14 hours, 32 minutes"


def test_totals_averages_prefill_saved_and_cost() -> None:
    clock = FakeClock()
    stats = Stats(clock=clock)
    stats.record("m", "m/0", True, 2.0, 0.5, Usage(1000, 500, 400))
    stats.record("m", "m/1", True, 2.0, 0.25, Usage(1000, 500, 0))
    stats.record(None, None, False, 0.001, None, None)  # refused before routing
    clock.now += 3600.0
    facts = [PoolFacts("m", ["m/0", "m/1"], prefill_tokens_per_s=2000.0, cost_per_gpu_hour=3.0)]
    view = stats.view(facts)
    assert view["request_count"] == 3
    assert view["total_tokens_generated"] == 1000
    assert view["avg_tokens_per_second"] == round(1000 / 4.001, 6)
    assert view["uptime"] == "0 days, 1 hours, 0 minutes"
    pool = view["pools"]["m"]
    assert pool["requests"] == 2 and pool["errors"] == 0
    assert pool["avg_ttft_s"] == 0.375
    assert pool["prefill_saved_s"] == 0.2  # 400 cached tokens at 2000 tokens/s
    # 2 workers x 1 h x 3.0 = 6.0 spent on 3000 tokens.
    assert pool["cost_per_million_tokens"] == 2000.0
    assert pool["cost_per_million_completion_tokens"] == 6000.0
    assert view["workers"]["m/0"]["cost_per_million_tokens"] == 2000.0
    unpriced = stats.view([PoolFacts("m", ["m/0"], 2000.0, None)])
    assert unpriced["pools"]["m"]["cost_per_million_tokens"] is None


def test_worker_tallies_are_bounded() -> None:
    stats = Stats()
    for i in range(MAX_WORKER_TALLIES + 10):
        stats.record("m", f"w{i}", True, 0.1, None, None)
    assert len(stats.workers) == MAX_WORKER_TALLIES
    stats.forget_workers(["w20"])
    assert list(stats.workers) == ["w20"]


def _chunk(payload: object) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def test_seed_events_rewrite_chat_chunks() -> None:
    rewrite = SeedEvents("r1", "chat")
    role = _chunk({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
    hello = _chunk({"choices": [{"index": 0, "delta": {"content": "Hel"}}]})
    world = _chunk({"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]})
    usage = _chunk({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}})
    out = rewrite(role + hello) + rewrite(world + usage) + rewrite(b"data: [DONE]\n\n")
    events = [json.loads(e[6:]) for e in out.split(b"\n\n") if e]
    assert events == [
        {"text": "Hel", "request_id": "r1", "tokens_generated": 1},
        {"text": "lo", "request_id": "r1", "tokens_generated": 2},
        {
            "text": "",
            "request_id": "r1",
            "tokens_generated": 2,
            "finish_reason": "stop",
            "final": True,
        },
    ]
    error = b'data: {"error": {"message": "x", "type": "t", "param": null, "code": "c"}}\n\n'
    assert rewrite(error) == error
    assert rewrite(b"") == b""
