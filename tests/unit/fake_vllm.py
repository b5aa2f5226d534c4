"""Stand-in for ``vllm serve`` and ``prefix-worker agent`` in the launcher's supervision tests.

Real vLLM cannot run here (no GPU, and the ``vllm`` extra is never installed), so the launcher is
pointed at this script instead. Its first argument is the role (``serve`` or ``agent``, as the
launcher renders them). It records its argv, pid and PYTHONHASHSEED to ``$STAND_IN_DIR/<role>.json``
once its signal handlers are in place, then sleeps until SIGTERM or SIGINT, records which signal
came in ``<role>.exit.json``, and exits with ``$STAND_IN_EXIT_<ROLE>`` (default 0).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from types import FrameType


def _write(path: Path, data: dict[str, object]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)  # atomic: the test never reads half a file


def main() -> None:
    role = sys.argv[1]
    out = Path(os.environ["STAND_IN_DIR"])
    code = int(os.environ.get(f"STAND_IN_EXIT_{role.upper()}", "0"))

    def on_signal(signum: int, frame: FrameType | None) -> None:
        _write(out / f"{role}.exit.json", {"signal": signal.Signals(signum).name})
        sys.exit(code)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    _write(
        out / f"{role}.json",
        {"argv": sys.argv[1:], "pid": os.getpid(), "hashseed": os.environ.get("PYTHONHASHSEED")},
    )
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
