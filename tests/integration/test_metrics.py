"""`/metrics` after real traffic: every family an operator needs, plausible values, and no
request data (prompt, session id, request id) in any label."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import GatewayFactory, SimFactory, chat_body, gateway_config, wait_for

PROMPT_MARK = "zebra-quokka-prompt-4711"
SESSION = "session-otter-0815"
REQUEST_ID = "req-heron-2323"

FAMILIES = (
    "prefix_router_requests",
    "prefix_router_request_duration_seconds",
    "prefix_router_time_to_first_token_seconds",
    "prefix_router_inter_token_seconds",
    "prefix_router_gateway_overhead_seconds",
    "prefix_router_prompt_tokens",
    "prefix_router_cached_prompt_tokens",
    "prefix_router_completion_tokens",
    "prefix_router_worker_in_flight",
    "prefix_router_worker_healthy",
    "prefix_router_worker_state",
    "prefix_router_routing_decisions",
    "prefix_router_matched_prefix_ratio",
    "prefix_router_retries",
    "prefix_router_worker_ejections",
    "prefix_router_queue_depth",
    "prefix_router_rate_limited",
    "prefix_router_redis_up",
)

Samples = dict[str, list[tuple[dict[str, str], float]]]


async def _scrape(http: aiohttp.ClientSession, url: str) -> tuple[set[str], Samples]:
    async with http.get(url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    families: set[str] = set()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return families, samples


def _total(samples: Samples, name: str, **labels: str) -> float:
    return sum(
        value
        for got, value in samples.get(name, [])
        if all(got.get(k) == v for k, v in labels.items())
    )


async def test_metrics_cover_traffic_errors_and_retries(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    workers = await sims(2)
    # Slow health checks: a worker stopped later still looks healthy, so requests reach its
    # dead port and are retried; one failure ejects it.
    config = gateway_config(
        [w.url for w in workers],
        health={"interval_s": 3600.0, "timeout_s": 1.0},
        outlier={"consecutive_failures": 1},
        pool={"policy": {"name": "round_robin"}},
    )
    url = await gateway(config)
    chat = url + "/v1/chat/completions"
    headers = {"X-Session-Id": SESSION, "X-Request-Id": REQUEST_ID}
    for stream in (False, True, False, True):
        body = chat_body(f"{PROMPT_MARK} tell me more", stream=stream)
        async with http.post(chat, json=body, headers=headers) as resp:
            assert resp.status == 200
            await resp.read()
    async with http.post(chat, json=chat_body(model="no-such-model"), headers=headers) as resp:
        assert resp.status == 404

    await workers[1].stop()

    async def retried() -> bool:
        async with http.post(chat, json=chat_body(f"{PROMPT_MARK} again")) as resp:
            assert resp.status == 200  # the retry on the live worker answers
            await resp.read()
        _, samples = await _scrape(http, url)
        return _total(samples, "prefix_router_retries_total") >= 1

    await wait_for(retried, what="a request retried after hitting the dead worker")

    families, samples = await _scrape(http, url)
    missing = [f for f in FAMILIES if f not in families]
    assert not missing, f"metric families missing: {missing}"

    assert _total(samples, "prefix_router_requests_total", status="200") >= 5
    assert _total(samples, "prefix_router_requests_total", status="404") == 1
    assert _total(samples, "prefix_router_time_to_first_token_seconds_count") >= 5
    assert _total(samples, "prefix_router_request_duration_seconds_count") >= 6
    assert _total(samples, "prefix_router_inter_token_seconds_count") >= 2  # 8 tokens a stream
    assert _total(samples, "prefix_router_gateway_overhead_seconds_count") >= 5
    # What the gateway added: some time, and less than the requests took end to end.
    overhead_s = _total(samples, "prefix_router_gateway_overhead_seconds_sum")
    assert 0 < overhead_s < _total(samples, "prefix_router_request_duration_seconds_sum")
    assert _total(samples, "prefix_router_prompt_tokens_total") > 0
    assert _total(samples, "prefix_router_completion_tokens_total") >= 5 * 8
    assert _total(samples, "prefix_router_routing_decisions_total", reason="round_robin") >= 5
    assert _total(samples, "prefix_router_matched_prefix_ratio_count") >= 5
    assert _total(samples, "prefix_router_worker_ejections_total") >= 1
    assert _total(samples, "prefix_router_worker_state", state="ejected") == 1
    assert _total(samples, "prefix_router_worker_state", state="healthy") == 2
    assert _total(samples, "prefix_router_worker_in_flight") == 0
    assert _total(samples, "prefix_router_redis_up") == 0.0  # the memory backend shares nothing

    leaked = [
        (name, labels)
        for name, rows in samples.items()
        for labels, _ in rows
        for value in labels.values()
        if PROMPT_MARK in value or SESSION in value or REQUEST_ID in value
    ]
    assert not leaked, f"request data in metric labels: {leaked}"
