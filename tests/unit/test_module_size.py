"""House rule 1: modules stay under 400 lines (DESIGN §9; issue 12 made it a hard bound)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 400


def test_no_module_of_the_project_is_over_the_limit() -> None:
    sources = [p for d in ("router", "workers", "loadtest") for p in (ROOT / d).rglob("*.py")]
    assert sources, "no sources found: the test would pass vacuously"
    too_long = {
        str(p.relative_to(ROOT)): n
        for p in sources
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > LIMIT
    }
    assert too_long == {}
