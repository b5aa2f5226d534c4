"""The one bounded, expiring map (sessions and the in-memory state backend use it)."""

from __future__ import annotations

from router.expiring import ExpiringLRU


def test_entries_expire_and_the_least_recently_used_goes_first() -> None:
    now = [0.0]
    lru: ExpiringLRU[str] = ExpiringLRU(2, clock=lambda: now[0])
    lru.put("a", "1", ttl_s=10)
    lru.put("b", "2", ttl_s=1)
    assert lru.get("a") == "1"  # a is now the most recently used
    lru.put("c", "3", ttl_s=10)
    assert lru.get("b") is None and len(lru) == 2
    now[0] = 10.0
    assert lru.get("a") is None and lru.get("c") is None and len(lru) == 0


def test_drop_values_removes_only_matching_entries() -> None:
    lru: ExpiringLRU[str] = ExpiringLRU(10)
    for key, value in (("s1", "w1"), ("s2", "w2"), ("s3", "w1")):
        lru.put(key, value, ttl_s=60)
    lru.drop_values(lambda value: value == "w1")
    assert (lru.get("s1"), lru.get("s2"), lru.get("s3")) == (None, "w2", None)
