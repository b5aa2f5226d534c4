"""Mooncake trace replay (shared blocks become shared words) and the pooled-capacity reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest.intrinsic import intrinsic_reuse, pooled_reuse
from loadtest.trace import TraceSpec, trace_workload


def write_trace(path: Path, rows: list[dict[str, object]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


ROWS: list[dict[str, object]] = [
    {"timestamp": 1000, "input_length": 1024, "output_length": 32, "hash_ids": [1, 2]},
    {"timestamp": 3000, "input_length": 1200, "output_length": 16, "hash_ids": [1, 2, 3]},
    {"timestamp": 5000, "input_length": 600, "output_length": 8, "hash_ids": [7, 8]},
]


def test_equal_ids_at_equal_positions_become_equal_text(tmp_path: Path) -> None:
    w = trace_workload(TraceSpec(write_trace(tmp_path / "t.jsonl", ROWS), scale=16))
    first, second, third = (s.system.split() for s in w.scripts)
    assert len(first) == 64 and len(second) == 75 and len(third) == 38  # ceil(tokens / 16)
    assert second[:64] == first  # blocks 1 and 2 shared
    assert not set(third) & set(first)  # other roots share no word
    assert [s.turns[0].max_tokens for s in w.scripts] == [2, 1, 1]
    # Time starts at the window's first request; speedup divides the clock.
    fast = trace_workload(TraceSpec(str(tmp_path / "t.jsonl"), speedup=2))
    assert [s.start_s for s in fast.scripts] == [0.0, 1.0, 2.0]


def test_chars_per_token_sets_word_length(tmp_path: Path) -> None:
    path = write_trace(tmp_path / "t.jsonl", ROWS)
    for cpt in (4, 12):
        text = trace_workload(TraceSpec(path, chars_per_token=cpt)).scripts[0].system
        assert len(text) / len(text.split()) == pytest.approx(cpt, abs=0.1)


def test_window_and_root_sampling(tmp_path: Path) -> None:
    path = write_trace(tmp_path / "t.jsonl", ROWS)
    window = trace_workload(TraceSpec(path, offset=1, count=1))
    assert len(window.scripts) == 1 and window.scripts[0].start_s == 0.0
    kept = []
    for seed in range(12):
        try:
            kept.append(len(trace_workload(TraceSpec(path, sessions=0.5, seed=seed)).scripts))
        except ValueError:
            kept.append(0)  # neither root drawn
    # Requests sharing a root (ids 1.. and 7..) are kept or dropped together.
    assert set(kept) == {0, 1, 2, 3}


def test_pooled_reference_is_intrinsic_with_room_and_less_without() -> None:
    a = list(range(64))
    b = list(range(1000, 1064))
    requests = [(a, [0]), (b, [0]), (a, [0]), (b, [0])]
    hits, total = intrinsic_reuse(requests)
    assert pooled_reuse(requests, 1000) == (hits, total)
    # Room for one prompt only: each repeat finds the other's blocks there.
    assert pooled_reuse(requests, 4)[0] == 0
    assert hits == 2 * 48  # (64 - 1) // 16 = 3 blocks per repeat


def test_external_routers_pair_commands_with_names() -> None:
    from loadtest.external_router import parse_routers

    cmds = ["/opt/a/bin/vllm-router --port {port}", "smg launch --port {port}"]
    assert parse_routers(cmds, ["vllm"]) == [("vllm", cmds[0]), ("smg", cmds[1])]
    assert parse_routers(None, None) == []
    with pytest.raises(SystemExit):
        parse_routers(cmds[:1], ["a", "b"])


def test_routing_report_renders_every_router(tmp_path: Path) -> None:
    from loadtest.routing_charts import markdown_table, write_tradeoff_chart

    row = {
        "hit_rate": 0.5,
        "of_pooled": 1.0,
        "ttft_p50_ms": 10.0,
        "ttft_p99_ms": 20.0,
        "e2e_p99_ms": 30.0,
        "imbalance": 1.1,
        "errors": 0,
    }
    data = {
        "workload": "trace",
        "description": "d",
        "workers": 8,
        "kv_blocks_per_worker": 100,
        "intrinsic_reuse": 0.6,
        "pooled_reference": 0.5,
        "rows": [{"policy": "hybrid", **row}, {"policy": "smg", **row, "hit_rate": 0.25}],
    }
    table = markdown_table(data)
    assert "| hybrid | 50.0 |" in table and "| smg | 25.0 |" in table
    png = tmp_path / "chart.png"
    write_tradeoff_chart(str(png), [data], ["trace"])
    assert png.read_bytes().startswith(b"\x89PNG")
