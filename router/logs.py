"""Logging setup: one JSON object per line, with the fields a record carries in `extra`; and
`LogOnce`, for bad input that background loops meet again every interval (a worker's broken
answer, a malformed Redis record), so each cause is logged once, not once per round.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import time
from collections import OrderedDict

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
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


class BatchedHandler(logging.handlers.MemoryHandler):
    """Lines go out in batches (one write for up to 256 of them, not one syscall a request):
    at once for warnings and errors, else when the buffer fills or FLUSH_EVERY_S passed."""

    def __init__(self, target: logging.Handler) -> None:
        super().__init__(capacity=256, flushLevel=logging.WARNING, target=target)
        self._flushed_at = time.monotonic()

    def shouldFlush(self, record: logging.LogRecord) -> bool:
        return super().shouldFlush(record) or (time.monotonic() - self._flushed_at >= FLUSH_EVERY_S)

    def flush(self) -> None:
        self._flushed_at = time.monotonic()
        super().flush()


def flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()


def setup_logging(level: str) -> None:
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [BatchedHandler(stream)]
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
