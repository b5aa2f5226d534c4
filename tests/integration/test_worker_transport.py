"""Workers reached over TLS, at IPv6 literals and under base paths: real servers, real TLS.

Certificates come from `trustme` (a throwaway CA made for the test); the https worker is the
real simulated worker served with vLLM's `--ssl-certfile/--ssl-keyfile` equivalents.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import web

from router.domain.worker import Health
from router.http.context import STATE
from router.serve import start_gateway
from tests.conftest import (
    FAST_SIM,
    MODEL,
    GatewayFactory,
    SimFactory,
    chat_body,
    gateway_config,
    wait_for,
)
from tests.sse import read_events
from workers.sim.app import build_sim_app
from workers.sim.config import SimConfig


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(ca: trustme.CA, tmp_path: Path) -> tuple[str, str, str]:
    """(CA bundle, server certificate chain, server key) for 127.0.0.1."""
    cert = ca.issue_cert("127.0.0.1")
    ca_file, chain, key = tmp_path / "ca.pem", tmp_path / "chain.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.private_key_pem.write_to_path(str(key))
    for blob in cert.cert_chain_pems:
        blob.write_to_path(str(chain), append=True)
    return str(ca_file), str(chain), str(key)


async def _answer(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.post(f"{url}/v1/chat/completions", json=chat_body(max_tokens=3)) as resp:
        return resp.status, await resp.text()


async def test_https_worker_with_the_pools_ca_serves_streams_and_answers(
    sims: SimFactory,
    gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    tls_files: tuple[str, str, str],
) -> None:
    ca_file, chain, key = tls_files
    (sim,) = await sims(1, ssl_certfile=chain, ssl_keyfile=key)
    assert sim.url.startswith("https://")
    url = await gateway(gateway_config([sim.url], pool={"tls": {"ca_file": ca_file}}))
    status, text = await _answer(http, url)
    assert status == 200, text
    stream = chat_body(max_tokens=4, stream=True)
    async with http.post(f"{url}/v1/chat/completions", json=stream) as resp:
        events, done = await read_events(resp)
    assert done and events


async def test_untrusted_certificate_is_unhealthy_and_a_clean_502_never_a_downgrade(
    sims: SimFactory,
    http: aiohttp.ClientSession,
    tls_files: tuple[str, str, str],
) -> None:
    _, chain, key = tls_files
    (sim,) = await sims(1, ssl_certfile=chain, ssl_keyfile=key)
    config = gateway_config([sim.url], health={"interval_s": 60.0})
    runner, url = await start_gateway(config)
    try:
        (worker,) = runner.app[STATE].registry.workers()
        # The health check uses the relay's TLS settings: the worker is not trusted.
        assert worker.health is Health.UNHEALTHY or worker.health is Health.UNPROVEN
        status, text = await _answer(http, url)
        assert status == 503, text
        # Even if it were believed healthy, the relay refuses its certificate (it never falls
        # back to plaintext): a clean OpenAI-shaped 502.
        worker.health = Health.HEALTHY
        status, text = await _answer(http, url)
        assert status == 502, text
        assert "TLS handshake failed" in text and '"type"' in text
    finally:
        await runner.cleanup()


async def test_verify_false_and_ssl_cert_file_reach_a_self_signed_worker(
    sims: SimFactory,
    gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    tls_files: tuple[str, str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ca_file, chain, key = tls_files
    (sim,) = await sims(1, ssl_certfile=chain, ssl_keyfile=key)
    lab = await gateway(gateway_config([sim.url], pool={"tls": {"verify": False}}))
    assert (await _answer(http, lab))[0] == 200
    monkeypatch.setenv("SSL_CERT_FILE", ca_file)  # OpenSSL's default paths honour it
    system = await gateway(gateway_config([sim.url]))
    assert (await _answer(http, system))[0] == 200


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback")
async def test_ipv6_literal_worker(
    sims: SimFactory, gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    (sim,) = await sims(1, host="::1")
    assert sim.url.startswith("http://[::1]:")
    url = await gateway(gateway_config([sim.url]))
    status, text = await _answer(http, url)
    assert status == 200, text


@pytest.fixture
async def prefixed_worker() -> AsyncIterator[str]:
    """The simulated worker's API mounted under /team-a, as a path-routing proxy serves it."""
    root = web.Application()
    root.add_subapp("/team-a", build_sim_app(SimConfig(model=MODEL, port=0, **FAST_SIM)))
    runner = web.AppRunner(root)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}/team-a"
    await runner.cleanup()


async def test_base_path_worker_is_checked_scraped_and_relayed_under_its_path(
    prefixed_worker: str, http: aiohttp.ClientSession
) -> None:
    runner, url = await start_gateway(gateway_config([prefixed_worker]))
    try:
        (worker,) = runner.app[STATE].registry.workers()
        assert worker.health is Health.HEALTHY  # /team-a/health and /team-a/v1/models
        await wait_for(lambda: worker.reported.updated_at > 0, what="scraped /team-a/metrics")
        status, text = await _answer(http, url)
        assert status == 200, text
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("ftp://h:1", "http:// or https://"),
        ("http://user:secret@h:1", "credentials"),
        ("http://h:1/v1", "without /v1"),
        ("http://h:1?x=1", "no query"),
        ("http://:1", "host"),
    ],
)
def test_a_worker_url_the_relay_cannot_use_is_a_config_error_naming_the_field(
    url: str, words: str
) -> None:
    from router.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as caught:
        parse_config({"auth": {"enabled": False}, "pools": {"m": {"workers": [{"url": url}]}}})
    (path, message), *_ = caught.value.problems
    assert path == "pools.m.workers.0.url"
    assert words in message
    assert "secret" not in str(caught.value)
