"""`prefix-router bench` without the benchmarks installed says what to install."""

from __future__ import annotations

import sys

import pytest

from router.bench import run_bench


def test_missing_benchmarks_name_the_extra_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The production image has no `loadtest` package: make it unimportable here.
    for name in [m for m in sys.modules if m == "loadtest" or m.startswith("loadtest.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    monkeypatch.setitem(sys.modules, "loadtest", None)  # import of it now fails
    assert run_bench("overhead", []) == 2
    assert "pip install 'prefix-router[bench]'" in capsys.readouterr().err
