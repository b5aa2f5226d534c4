"""What a config reload may change while the gateway runs, and what needs a restart.

The listen address is bound, the state backend's connections and followers are built, and the
drain timeout is handed to the HTTP runner, all once at start: a reload that changes any of
them is refused, naming each field, so the operator knows the file and the running gateway
differ. Every other section is applied by the reload.
"""

from __future__ import annotations

from pydantic import BaseModel

from router.config.gateway import GatewayConfig

RESTART_ONLY = ("listen", "state", "drain_timeout_s")


def restart_needed(running: GatewayConfig, new: GatewayConfig) -> list[tuple[str, str]]:
    """(field path, message) for every restart-only field the new config changes."""
    problems: list[tuple[str, str]] = []
    for section in RESTART_ONLY:
        old_value, new_value = getattr(running, section), getattr(new, section)
        if old_value == new_value:
            continue
        if isinstance(old_value, BaseModel) and isinstance(new_value, BaseModel):
            paths = [
                f"{section}.{name}"
                for name in type(old_value).model_fields
                if getattr(old_value, name) != getattr(new_value, name)
            ]
        else:
            paths = [section]
        problems.extend((path, "needs a restart; the running config is kept") for path in paths)
    return problems
