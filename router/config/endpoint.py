"""A worker's base URL as the relay reaches it, parsed once (with yarl) when the config loads.

`http://` and `https://` only; a host (a name, an IPv4 address, or an IPv6 literal in
brackets); an optional port (default 80 or 443) and base path (`http://h:8000/prefix`, for a
worker behind a path-routing proxy). User info, a query or a fragment cannot be relayed and are
config errors, as is a base URL that already ends in `/v1`.
"""

from __future__ import annotations

from dataclasses import dataclass

from yarl import URL


@dataclass(frozen=True, slots=True)
class Endpoint:
    tls: bool
    host: str
    """Without brackets: what the socket connects to, and TLS's server name."""
    port: int
    base_path: str
    """"" or a path without a trailing slash; requests go to base_path + "/v1/..."."""

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.tls else 80
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def origin(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host_header}"

    def url(self, path: str) -> str:
        """The worker's URL for an API path (`/health`, `/v1/models`)."""
        return self.origin + self.base_path + path

    def target(self, path: str) -> str:
        """The request target of an HTTP/1.1 request line for an API path."""
        return self.base_path + path


def parse_endpoint(text: str) -> Endpoint:
    """Raises ValueError, in words an operator can act on, for a URL the relay cannot use."""
    try:
        url = URL(text.strip())
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a URL: {exc}") from None
    if url.scheme not in ("http", "https"):
        raise ValueError("a worker URL starts with http:// or https://")
    if not url.host:
        raise ValueError("a worker URL needs a host")
    if url.user is not None or url.password is not None:
        raise ValueError("a worker URL cannot carry credentials")
    if url.query_string or url.fragment:
        raise ValueError("a worker URL is a base URL: no query or fragment")
    try:
        port = url.port
    except ValueError as exc:
        raise ValueError(f"bad port: {exc}") from None
    assert port is not None  # yarl gives the scheme's default for http and https
    path = url.path.rstrip("/")
    if path.endswith("/v1"):
        raise ValueError("give the worker's base URL, without /v1")
    return Endpoint(tls=url.scheme == "https", host=url.host, port=port, base_path=path)
