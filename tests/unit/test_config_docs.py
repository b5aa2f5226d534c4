"""The generated configuration reference: complete, faithful to the models, and committed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from router.config import POLICY_NAMES, GatewayConfig
from router.config_docs import REGENERATE, render_markdown

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def _row(markdown: str, path: str) -> list[str]:
    for line in markdown.splitlines():
        if line.startswith(f"| `{path}` |"):
            return [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
    raise AssertionError(f"no row for {path}")


def test_committed_reference_is_current() -> None:
    committed = DOCS.read_text() if DOCS.exists() else ""
    assert committed == render_markdown(), (
        f"docs/configuration.md is out of date with router/config/; regenerate it: {REGENERATE}"
    )


def test_every_leaf_field_of_the_routing_yaml_has_a_row() -> None:
    markdown = render_markdown()
    expected = [
        "listen.port",
        "auth.enabled",
        "auth.keys[].limits.tokens_per_minute",
        "state.redis_url",
        "pools.<model>.workers[].url",
        "pools.<model>.index.block_chars",
        "pools.<model>.policy.session_margin_s",
        "pools.<model>.policy.virtual_nodes",
        "pools.<model>.policy.cache_threshold",
    ]
    expected += [f"{name}" for name in GatewayConfig.model_fields]
    for path in expected:
        _row(markdown, path)
    for name in POLICY_NAMES:
        assert f"### `pools.<model>.policy` with `name: {name}`" in markdown


def test_rows_carry_type_constraints_default_and_description() -> None:
    markdown = render_markdown()
    assert _row(markdown, "timeouts.idle_s") == [
        "`timeouts.idle_s`",
        "`float` (> 0)",
        "`30.0`",
        "longest gap between two streamed chunks",
    ]
    assert _row(markdown, "auth")[2] == "**required**"
    assert _row(markdown, "log_level")[1] == r'`"debug" \| "info" \| "warning" \| "error"`'
    assert _row(markdown, "pools.<model>.policy")[2] == "`name: hybrid`"


class _Leaf(BaseModel):
    """A leaf model.

    Only the first paragraph of a docstring is shown.
    """

    depth_s: float = Field(1.5, gt=0, description="how deep | really")


class _Red(BaseModel):
    name: Literal["red"] = "red"
    shade: int = 3


class _Blue(BaseModel):
    name: Literal["blue"] = "blue"


class _Root(BaseModel):
    required_flag: bool
    leaves: list[_Leaf] = Field(default_factory=list)
    by_key: dict[str, _Leaf] = Field(default_factory=dict)
    colour: Annotated[_Red | _Blue, Field(discriminator="name")] = Field(default_factory=_Blue)


def test_walks_lists_dicts_and_discriminated_unions() -> None:
    markdown = render_markdown(_Root)
    assert _row(markdown, "required_flag")[2] == "**required**"
    assert _row(markdown, "leaves[].depth_s")[1:] == [
        "`float` (> 0)",
        "`1.5`",
        r"how deep \| really",
    ]
    _row(markdown, "by_key.<key>.depth_s")
    assert _row(markdown, "colour.shade")[2] == "`3`"
    assert "One of 2 variants, chosen by `name`: `red`, `blue`. Default: `blue`." in markdown
    assert "A leaf model." in markdown
    assert "Only the first paragraph" not in markdown
