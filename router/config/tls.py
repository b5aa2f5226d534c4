"""How the gateway checks its `https://` workers: one setting per pool, one SSL context from it.

Verification is on by default, against the system trust store (OpenSSL's default paths, so
`SSL_CERT_FILE` and `SSL_CERT_DIR` are honoured) plus the pool's `ca_file` when given. The relay,
health checks and load scraping all use the same context, so a worker is never "healthy" while
every relayed request to it fails. `verify: false` is for labs with self-signed workers.
"""

from __future__ import annotations

import ssl

from pydantic import Field, model_validator

from router.config.base import Strict


class TlsConfig(Strict):
    """TLS to the pool's https:// workers (relay, health checks and scraping alike)."""

    verify: bool = Field(True, description="check the workers' certificates and host names")
    ca_file: str | None = Field(
        None,
        description="PEM file of the CA(s) that signed the workers' certificates, trusted "
        "besides the system store",
    )

    @model_validator(mode="after")
    def _loadable(self) -> TlsConfig:
        client_context(self)  # a missing or malformed CA file fails the config, naming it
        return self


def client_context(config: TlsConfig) -> ssl.SSLContext:
    """A fresh client context (built at config load and reload, so a rotated CA file is read
    again; never per request)."""
    context = ssl.create_default_context()
    if config.ca_file is not None:
        try:
            context.load_verify_locations(cafile=config.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"ca_file {config.ca_file!r} cannot be loaded: {exc}") from None
    if not config.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
