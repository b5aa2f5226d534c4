"""The loop's lock-free histogram and counter export what prometheus-client's own would."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from router.loop_metrics import LoopCounter, LoopHistogram

BUCKETS = (0.000005, 0.001, 0.01, 0.5, 1.0, 10.0)
OBSERVED = [0.0, 0.000005, 0.0000051, 0.001, 0.0099, 0.5, 0.75, 1.0, 9.99, 10.0, 11.0, 1e9]


def _series(registry: CollectorRegistry) -> list[str]:
    lines = generate_latest(registry).decode().splitlines()
    return sorted(line for line in lines if not line.startswith("#") and "_created" not in line)


def test_buckets_count_and_sum_match_prometheus_clients_histogram() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("gap_seconds", "gaps", ["model"], buckets=BUCKETS, registry=theirs)
    loop = LoopHistogram("gap_seconds", "gaps", ["model"], BUCKETS, registry=ours)
    for model in ("a", "b"):
        for value in OBSERVED if model == "a" else OBSERVED[:3]:
            reference.labels(model).observe(value)
            loop.labels(model).observe(value)
    assert _series(ours) == _series(theirs)
    assert any('le="+Inf"' in line and line.endswith(" 12.0") for line in _series(ours))


def test_counts_match_prometheus_clients_counter_and_never_go_down() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Counter("tokens", "tokens seen", ["model", "kind"], registry=theirs)
    loop = LoopCounter("tokens", "tokens seen", ["model", "kind"], registry=ours)
    for labels, amount in ((("a", "x"), 1.0), (("a", "x"), 41.5), (("b", "y"), 3.0)):
        reference.labels(*labels).inc(amount)
        loop.labels(*labels).inc(amount)
    assert _series(ours) == _series(theirs)
    with pytest.raises(ValueError):
        loop.labels("a", "x").inc(-1)
    with pytest.raises(ValueError):
        loop.labels("a")
