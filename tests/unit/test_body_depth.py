"""The request body's nesting limit, at its boundary (the value itself is level 1)."""

from __future__ import annotations

from typing import Any

from router.http.body import _depth_ok


def _nested(levels: int) -> Any:
    value: Any = "x"
    for i in range(levels):
        value = [value] if i % 2 else {"k": value}
    return value


def test_nesting_is_counted_level_by_level_over_lists_and_objects() -> None:
    for levels in (1, 2, 5, 32, 33):
        body = _nested(levels)
        assert _depth_ok(body, levels)
        assert not _depth_ok(body, levels - 1)
    # The deepest branch counts, wherever it is among shallow siblings.
    wide = {"messages": [{"role": "user", "content": "hi"}] * 50 + [_nested(10)]}
    assert _depth_ok(wide, 12) and not _depth_ok(wide, 11)
    assert _depth_ok({}, 1) and _depth_ok([], 1) and not _depth_ok([[]], 1)
