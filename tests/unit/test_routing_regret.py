"""`bench routing-regret`: a route's regret is what another worker held beyond the chosen one."""

from __future__ import annotations

from pathlib import Path

from loadtest.replay import Record, read_records, write_records
from loadtest.routing_regret import report, routing_regret


def _record(text: str, worker: str, cached: int) -> Record:
    messages = [{"role": "user", "content": text}]
    return Record(sent_s=0.0, messages=messages, e2e_s=0.1, worker=worker, cached_tokens=cached)


def test_a_prefix_sent_away_from_its_holder_is_regret_and_records_round_trip(
    tmp_path: Path,
) -> None:
    history = " ".join(f"w{i}" for i in range(200))  # 200 tokens: 12 whole blocks
    records = [
        _record(history, "a", 0),
        _record(history + " next", "b", 0),  # a held 12 blocks of it: b recomputed them
        _record(history + " again", "a", 192),  # back where it was: no regret
        _record("unrelated words only", "b", 0),
    ]
    path = tmp_path / "records.jsonl"
    write_records(str(path), records)
    regret = routing_regret(read_records(str(path)), kv_blocks=1000)
    assert regret.best - regret.replayed == 192
    assert regret.replayed == regret.reported == 192
    assert regret.largest[0][1:] == (1, 0, 192, "b", "a")
    # A cache too small for the history leaves nothing to regret.
    assert routing_regret(records, kv_blocks=4).best == 0
    assert f"regret {192 / regret.prompt_tokens:.2%}" in report(regret)[1]
