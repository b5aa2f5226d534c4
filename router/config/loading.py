"""Reading and validating the routing YAML, and the one-pool config of the quick start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from router.config.gateway import GatewayConfig


class ConfigError(Exception):
    """A routing YAML that cannot be used; `problems` lists (field path, message)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{path}: {msg}" for path, msg in problems))


def parse_config(data: Any) -> GatewayConfig:
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as exc:
        problems = [
            (".".join(str(p) for p in err["loc"]) or "(top)", err["msg"]) for err in exc.errors()
        ]
        raise ConfigError(problems) from None


def load_config(path: str | Path) -> GatewayConfig:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError([("(file)", str(exc))]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([("(yaml)", str(exc))]) from None
    if not isinstance(data, dict):
        raise ConfigError([("(top)", "the routing YAML must be a mapping")])
    return parse_config(data)


def quick_config(
    model: str,
    worker_urls: list[str],
    *,
    policy: str = "hybrid",
    host: str = "127.0.0.1",
    port: int = 8080,
    redis_url: str | None = None,
    redis_cluster: bool = False,
    api_key_hash: str | None = None,
) -> GatewayConfig:
    """The one-pool config `prefix-router serve --model --worker` builds (DESIGN.md §10.2)."""
    state: dict[str, Any] = {"backend": "memory"}
    if redis_url:
        state = {"backend": "redis", "redis_url": redis_url, "cluster": redis_cluster}
    auth: dict[str, Any] = {"enabled": False}
    if api_key_hash:
        key = {"tenant": "default", "sha256": api_key_hash.lower(), "admin": True}
        auth = {"enabled": True, "keys": [key]}
    return parse_config(
        {
            "listen": {"host": host, "port": port},
            "auth": auth,
            "state": state,
            "pools": {
                model: {"workers": [{"url": u} for u in worker_urls], "policy": {"name": policy}}
            },
        }
    )
