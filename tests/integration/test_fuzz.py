"""Property-based: random bodies and headers never get a 500, a traceback or a hang.

Header values range over all of Unicode (and bytes that are not UTF-8): an X-Request-Id the
upstream request cannot carry must be replaced, never turned into a 500.

The gateway and its simulated worker run as real processes; hypothesis drives a plain
synchronous HTTP client at them, and a normal request must still succeed afterwards.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loadtest.procs import Fleet, start_gateway_process, start_sim

MODEL = "fuzz-llm"


def _wait_ready(url: str, path: str) -> None:
    deadline = time.monotonic() + 30
    host, port = url.removeprefix("http://").split(":")
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection(host, int(port), timeout=2)
        try:
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.05)  # polling a process we started; not synchronizing test logic
    raise AssertionError(f"{url}{path} not ready")


@pytest.fixture(scope="module")
def gateway_url() -> Iterator[str]:
    fleet = Fleet()
    sim = start_sim(MODEL, ["--time-scale", "0"])
    fleet.procs.append(sim)
    try:
        _wait_ready(sim.url, "/health")
        config = {
            "listen": {"host": "127.0.0.1", "port": 0},
            "log_level": "warning",
            "auth": {"enabled": False},
            "limits": {"max_body_bytes": 65536, "max_json_depth": 16},
            "pools": {
                MODEL: {
                    "workers": [{"url": sim.url}],
                    "max_prompt_tokens": 2000,
                    "max_tokens_limit": 64,
                }
            },
        }
        gateway = start_gateway_process(config)
        fleet.procs.append(gateway)
        _wait_ready(gateway.url, "/ready")
        yield gateway.url
    finally:
        fleet.stop()


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool"]) | json_values},
        optional={"content": st.text(max_size=200) | json_values, "name": json_values},
    ),
    max_size=4,
)
bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from([MODEL, "nope", ""]) | json_values,
        "messages": messages | json_values,
        "prompt": st.text(max_size=200)
        | st.lists(st.integers(0, 50000), max_size=20)
        | json_values,
        "max_tokens": st.integers(-5, 100) | json_values,
        "n": st.integers(-1, 20) | json_values,
        "stream": st.booleans() | json_values,
        "stream_options": json_values,
        "temperature": st.floats(allow_nan=False) | json_values,
        "user": json_values,
    },
)
header_names = st.sampled_from(
    [
        "Authorization",
        "X-Session-Id",
        "X-Priority",
        "X-Request-Id",
        "x-api-key",
        "Content-Type",
        "X-Route-To-Worker",
        "X-Tenant",
    ]
)
# Control characters (but tab) cannot be framed in a field value at all; everything else can:
# any Unicode character, sent as UTF-8 as most clients do, and raw bytes that are not UTF-8.
_FRAMEABLE_BYTES = bytes(b for b in range(256) if b == 0x09 or 0x20 <= b != 0x7F)
header_values = st.text(
    alphabet=st.characters(
        exclude_categories=["Cs"],
        exclude_characters=[chr(c) for c in range(0x20) if c != 0x09] + ["\x7f"],
    ),
    max_size=40,
).map(lambda value: value.strip(" \t").encode()) | st.lists(
    st.sampled_from(_FRAMEABLE_BYTES), max_size=40
).map(lambda values: bytes(values).strip(b" \t"))
headers = st.dictionaries(header_names, header_values, max_size=4)
payloads = bodies.map(lambda b: json.dumps(b).encode()) | st.binary(max_size=300)


def _send(
    url: str, path: str, payload: bytes, hdrs: dict[str, str] | dict[str, bytes]
) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=20)  # a hang fails the test
    try:
        conn.request("POST", path, body=payload, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _check(status: int, body: bytes) -> None:
    assert status != 500 and status < 600, body[:300]
    if status >= 400:
        error: Any = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"}
    elif b"data: " in body[:6]:
        tail = body.rstrip()
        assert tail.endswith(b"data: [DONE]") or b'"error"' in tail.rsplit(b"\n", 1)[-1]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
    payload=payloads,
    hdrs=headers,
)
def test_random_input_never_breaks_the_gateway(
    gateway_url: str, path: str, payload: bytes, hdrs: dict[str, bytes]
) -> None:
    status, body = _send(gateway_url, path, payload, hdrs)
    _check(status, body)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hdrs=headers, request_id=header_values, stream=st.booleans())
def test_any_header_values_on_a_valid_request_are_served(
    gateway_url: str, hdrs: dict[str, bytes], request_id: bytes, stream: bool
) -> None:
    # Always an X-Request-Id: it is the header that goes on to the worker.
    hdrs = {**hdrs, "X-Request-Id": request_id}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    status, raw = _send(gateway_url, "/v1/chat/completions", json.dumps(body).encode(), hdrs)
    assert status == 200, raw[:300]
    _check(status, raw)


def test_gateway_still_serves_after_the_fuzzing(gateway_url: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "still alive?"}]}
    status, raw = _send(gateway_url, "/v1/chat/completions", json.dumps(body).encode(), {})
    assert status == 200, raw
    assert json.loads(raw)["choices"][0]["message"]["content"]
