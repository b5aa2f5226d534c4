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
_ENCODE = json.JSONEncoder(default=str).encode
"""One encoder for every line: `json.dumps` with `default=` builds a new one per call."""


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
        fields = {
            key: value
            for key, value in record.__dict__.items()
            if key not in _STANDARD and not key.startswith("_")
        }
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        return self.line(
            record.created, record.levelname.lower(), record.name, record.getMessage(), fields
        )

    def line(
        self, created: float, level: str, logger: str, msg: str, fields: dict[str, object]
    ) -> str:
        entry: dict[str, object] = {
            "ts": self._ts(created),
            "level": level,
            "logger": logger,
            "msg": msg,
        }
        entry.update(fields)
        return _ENCODE(entry)


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
            line = self.format(record)
        except Exception:  # logging's own contract: report, never raise
            self.handleError(record)
            return
        self.add_line(line, record.levelno)

    def add_line(self, line: str, levelno: int = logging.INFO) -> None:
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            self._lines.append(line)
        if (
            levelno >= logging.WARNING
            or len(self._lines) >= BATCH_LINES
            or time.monotonic() - self._flushed_at >= FLUSH_EVERY_S
        ):
            self.flush()

    def flush(self) -> None:
        self._flushed_at = time.monotonic()
        with self.lock:  # type: ignore[union-attr]
            lines, self._lines = self._lines, []
        if not lines:
            return
        try:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # stderr closed or full: losing log lines must not fail requests


class AccessLog:
    """One JSON line per request on `logger` at INFO, formatted straight into the batched
    handler when that is where the line would go anyway: a LogRecord, the logger's dispatch and
    the formatter's walk over the record cost more than the line's own fields, once a request.
    Whenever anything else could see the record (another handler, a filter, a test capturing
    records, another formatter) it goes through `logging` as any line does, so what a line says
    and where it goes stay the logging configuration's."""

    def __init__(self, logger: logging.Logger, msg: str = "request") -> None:
        self._logger = logger
        self._msg = msg

    def emit(self, fields: dict[str, object]) -> None:
        logger = self._logger
        if not logger.isEnabledFor(logging.INFO):
            return
        handler = self._sole_handler()
        if handler is None:
            logger.info(self._msg, extra=fields)
            return
        formatter = handler.formatter
        assert isinstance(formatter, JsonFormatter)
        handler.add_line(formatter.line(time.time(), "info", logger.name, self._msg, fields))

    def _sole_handler(self) -> BatchedHandler | None:
        """The root's BatchedHandler, if it alone would take this logger's INFO records."""
        node: logging.Logger | None = self._logger
        root = logging.getLogger()
        while node is not None and node is not root:
            if node.handlers or node.filters or not node.propagate:
                return None
            node = node.parent
        handlers = root.handlers
        if root.filters or len(handlers) != 1:
            return None
        handler = handlers[0]
        if (
            type(handler) is not BatchedHandler
            or handler.filters
            or handler.level > logging.INFO
            or type(handler.formatter) is not JsonFormatter
        ):
            return None
        return handler


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
