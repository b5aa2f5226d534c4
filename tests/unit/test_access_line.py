"""The access log's direct line: what logging would write, without a LogRecord."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Iterator

import pytest

from router.logs import AccessLog, BatchedHandler

FIELDS: dict[str, object] = {
    "request_id": "r-1",
    "status": 200,
    "worker": None,
    "segments": ["w0", "w1"],
    "ttft_s": 0.012345,
}


@contextlib.contextmanager
def only_batched() -> Iterator[tuple[io.StringIO, BatchedHandler]]:
    """The root logger as `setup_logging` leaves it: one BatchedHandler (pytest's own capture
    handlers, which it adds as the test runs, set aside meanwhile)."""
    stream = io.StringIO()
    handler = BatchedHandler(stream)
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        yield stream, handler
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    for line in lines:
        line.pop("ts")
    return lines


def test_the_direct_line_equals_the_one_logging_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    logger = logging.getLogger("prefix_router.test_access")
    access = AccessLog(logger)

    def no_record(*_: object, **__: object) -> logging.LogRecord:
        raise AssertionError("the direct path makes no LogRecord")

    with only_batched() as (stream, handler):
        with monkeypatch.context() as patched:
            patched.setattr(logger, "makeRecord", no_record)
            access.emit(FIELDS)
        logger.addFilter(lambda _record: True)  # a filter could drop the line: logging decides
        try:
            access.emit(FIELDS)
        finally:
            logger.filters.clear()
        handler.flush()
    direct, through_logging = _lines(stream)
    assert direct == through_logging
    assert direct["logger"] == "prefix_router.test_access" and direct["segments"] == ["w0", "w1"]


def test_another_handler_or_a_level_above_info_takes_the_logging_path(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("prefix_router.test_access")
    caplog.set_level(logging.INFO, logger="prefix_router.test_access")
    with only_batched() as (stream, handler):
        logging.getLogger().addHandler(caplog.handler)  # a second handler: logging's path
        AccessLog(logger).emit(FIELDS)
        assert [r.getMessage() for r in caplog.records] == ["request"]
        logger.setLevel(logging.WARNING)
        AccessLog(logger).emit(FIELDS)
        handler.flush()
    assert len(caplog.records) == 1 and len(_lines(stream)) == 1
