"""One structured access-log record per request, request ids end to end, and the log level the
routing YAML names."""

from __future__ import annotations

import io
import json
import logging
import re

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from router.auth import hash_key
from router.logs import BatchedHandler, JsonFormatter, setup_logging
from tests.conftest import MODEL, GatewayFactory, SimFactory, chat_body, gateway_config, wait_for

KEY = "pr-team-key-0123456789"
HEADERS = {"Authorization": f"Bearer {KEY}"}


def _records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "prefix_router.access"]


async def test_access_log_fields_and_request_ids(
    sims: SimFactory,
    gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="prefix_router.access")
    workers = await sims(2)
    auth = {"enabled": True, "keys": [{"tenant": "team-a", "sha256": hash_key(KEY)}]}
    url = await gateway(gateway_config([w.url for w in workers], auth=auth))
    chat = url + "/v1/chat/completions"

    async with http.post(
        chat, json=chat_body(), headers={**HEADERS, "X-Request-Id": "trace-1"}
    ) as r:
        assert r.status == 200
        assert r.headers["X-Request-Id"] == "trace-1"
        # The simulated worker names its completion after the X-Request-Id it received.
        assert (await r.json())["id"].endswith("trace-1")
    async with http.post(chat, json=chat_body(stream=True), headers=HEADERS) as r:
        assert r.status == 200
        generated = r.headers["X-Request-Id"]
        await r.read()
    async with http.post(url + "/generate", json={"prompt": "hi", "max_tokens": 3}) as r:
        assert r.status == 401

    records = _records(caplog)
    assert len(records) == 3
    plain, streamed, refused = (vars(r) for r in records)
    assert plain["request_id"] == "trace-1"
    assert streamed["request_id"] == generated
    for entry in (plain, streamed):
        assert entry["tenant"] == "team-a"
        assert entry["model"] == MODEL and entry["status"] == 200
        assert entry["worker"] in {f"{MODEL}/0", f"{MODEL}/1"}
        assert entry["reason"]
        assert entry["retries"] == 0 and entry["attempts"] == 1
        assert entry["ttft_s"] > 0 and entry["duration_s"] > 0
        assert entry["prompt_tokens"] > 0 and entry["completion_tokens"] == 8
        assert entry["cached_tokens"] is not None
    assert refused["status"] == 401 and refused["tenant"] is None
    assert refused["path"] == "/generate" and refused["worker"] is None

    line = json.loads(JsonFormatter().format(records[0]))
    assert line["request_id"] == "trace-1" and line["tenant"] == "team-a"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"])
    assert KEY not in caplog.text


def test_log_level_comes_from_the_routing_yaml() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        config = gateway_config(["http://127.0.0.1:9"], log_level="warning")
        setup_logging(config.log_level)
        assert root.level == logging.WARNING
        (handler,) = root.handlers
        assert isinstance(handler, BatchedHandler)
        assert isinstance(handler.formatter, JsonFormatter)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


async def test_a_client_that_hangs_up_is_a_499_before_and_after_the_first_byte(
    sims: SimFactory,
    gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="prefix_router.access")
    (sim,) = await sims(1, time_scale=1.0)
    url = await gateway(gateway_config([sim.url]))
    chat = url + "/v1/chat/completions"
    fault = {"kind": "hang_before_first_byte", "count": 1}
    async with http.post(sim.url + "/sim/faults", json=fault) as r:
        assert r.status == 200
    timeout = aiohttp.ClientTimeout(total=0.3)
    with pytest.raises(TimeoutError):  # hangs up while the worker has sent nothing
        async with http.post(chat, json=chat_body(), timeout=timeout) as r:
            await r.read()
    async with http.post(chat, json=chat_body(stream=True, max_tokens=500)) as r:
        assert r.status == 200
        await r.content.readline()  # the first event came; then the client hangs up
        r.close()

    def logged() -> list[int]:
        return [vars(record)["status"] for record in _records(caplog)]

    await wait_for(lambda: len(logged()) == 2, what="both requests logged")
    assert logged() == [499, 499]
    async with http.get(url + "/metrics") as r:
        text = await r.text()
    hung_up = sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "prefix_router_requests_total" and sample.labels["status"] == "499"
    )
    assert hung_up == 2


def test_log_lines_go_out_in_batches_and_warnings_at_once() -> None:
    stream = io.StringIO()
    handler = BatchedHandler(stream, logging.Formatter())
    logger = logging.getLogger("prefix_router.test_batches")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logger.info("one")
        logger.info("two")
        assert stream.getvalue() == ""  # buffered: no write per line
        logger.warning("three")
        assert stream.getvalue().splitlines() == ["one", "two", "three"]
        logger.info("four")
        handler.flush()  # what the gateway's flush loop does every FLUSH_EVERY_S
        assert stream.getvalue().splitlines()[-1] == "four"
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
