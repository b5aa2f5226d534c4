"""Logging setup: one JSON object per line, with the fields a record carries in `extra`; and
`LogOnce`, for bad input that background loops meet again every interval (a worker's broken
answer, a malformed Redis record), so each cause is logged once, not once per round.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import OrderedDict
from typing import TextIO

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""

    def _ts(self, created: float) -> str:
        second = int(created)
        if second != self._second:  # strftime once a second, not once a line
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((created - second) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": self._ts(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


FLUSH_EVERY_S = 0.25
"""How long a buffered line may wait: the gateway's flush loop (serve.py) and any record a
quarter second after the last flush write the buffer out."""
BATCH_LINES = 256


class BatchedHandler(logging.Handler):
    """Lines go out in batches, one write for up to BATCH_LINES of them (not a write and a
    flush a line, as a StreamHandler does): at once for warnings and errors, else when the
    batch is full or FLUSH_EVERY_S passed. Each record is formatted when it is logged, so a
    batch holds strings, not the records' arguments."""

    def __init__(self, stream: TextIO, formatter: logging.Formatter | None = None) -> None:
        super().__init__()
        self.stream = stream
        self.setFormatter(formatter or JsonFormatter())
        self._lines: list[str] = []
        self._flushed_at = time.monotonic()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._lines.append(self.format(record))
        except Exception:  # logging's own contract: report, never raise
            self.handleError(record)
            return
        if (
            record.levelno >= logging.WARNING
            or len(self._lines) >= BATCH_LINES
            or time.monotonic() - self._flushed_at >= FLUSH_EVERY_S
        ):
            self.flush()

    def flush(self) -> None:
        self._flushed_at = time.monotonic()
        lines, self._lines = self._lines, []
        if not lines:
            return
        try:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # stderr closed or full: losing log lines must not fail requests


def flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()


def setup_logging(level: str) -> None:
    # The logging HOWTO's "Optimization": no caller lookup, thread or process names per
    # record; a JSON line never shows them.
    logging._srcfile = None  # documented switch, no public API
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [BatchedHandler(sys.stderr)]
    set_log_level(level)
    # aiohttp's own access log duplicates ours.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def set_log_level(level: str) -> None:
    """The gateway's log level (at start, and when a reload changes `log_level`)."""
    logging.getLogger().setLevel(level.upper())


class LogOnce:
    """Logs each (subject, cause) once until `clear(subject)` (the subject recovered or left).

    `cause` must be a bounded category chosen by the caller (never raw input); the number of
    subjects remembered is bounded too, the oldest forgotten first."""

    def __init__(self, logger: logging.Logger, max_subjects: int = 10_000) -> None:
        self._logger = logger
        self._max_subjects = max_subjects
        self._seen: OrderedDict[str, set[str]] = OrderedDict()

    def warning(self, subject: str, cause: str, msg: str, *args: object) -> bool:
        """Log `msg` at WARNING unless this subject's cause was logged already; whether it was."""
        causes = self._seen.get(subject)
        if causes is None:
            causes = self._seen[subject] = set()
            while len(self._seen) > self._max_subjects:
                self._seen.popitem(last=False)
        if cause in causes:
            return False
        causes.add(cause)
        self._logger.warning(msg, *args)
        return True

    def clear(self, subject: str) -> None:
        self._seen.pop(subject, None)
