"""The configuration reference, generated from the pydantic models so it cannot drift.

`render_markdown()` walks `GatewayConfig` and every model nested in it (through plain fields,
lists and dicts) and renders one table per model: the field's full path, its type with its
constraints, its default and its description. A union discriminated by `name` (the routing
policies) gets one table per variant. `python -m router.config_docs > docs/configuration.md`
regenerates the committed copy; a unit test fails when the two differ.
"""

from __future__ import annotations

import enum
import inspect
import json
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from router.config import GatewayConfig

REGENERATE = "python -m router.config_docs > docs/configuration.md"

# How a dict field's key appears in a path; any other dict uses `<key>`.
_KEY_PLACEHOLDERS = {"pools": "<model>"}

# annotated_types / pydantic metadata attribute -> how the constraint reads.
_CONSTRAINTS = (
    ("gt", "> {}"),
    ("ge", ">= {}"),
    ("lt", "< {}"),
    ("le", "<= {}"),
    ("min_length", "min length {}"),
    ("max_length", "max length {}"),
    ("pattern", "matches `{}`"),
)

_INTRO = f"""\
# Configuration reference

<!-- Generated from router/config/ by `{REGENERATE}`. Do not edit by hand. -->

The gateway reads one routing YAML (`prefix-router serve --config FILE`). Every mapping in it
forbids unknown fields, so a misspelt key is an error rather than a silent default.
`prefix-router check FILE` validates a file and prints each problem with its field path, in the
same dotted form as the paths below. `<model>` stands for a pool's model name (a key under
`pools`) and `[]` for any item of a list. Durations are in seconds (names ending in `_s`).
"""


@dataclass(frozen=True)
class _Section:
    path: str
    model: type[BaseModel]
    variant: str | None = None  # the discriminator value when the model is one union member


@dataclass(frozen=True)
class _Union:
    path: str
    discriminator: str
    members: tuple[type[BaseModel], ...]
    default: str | None


def _non_none(annotation: Any) -> list[Any]:
    if get_origin(annotation) in (Union, types.UnionType):
        return [a for a in get_args(annotation) if a is not type(None)]
    return [annotation]


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _nested(name: str, annotation: Any) -> tuple[str, list[type[BaseModel]]]:
    """The models a field holds and the path step to reach one: '', '[]' or '.<key>'."""
    parts = _non_none(annotation)
    if len(parts) == 1:
        origin, args = get_origin(parts[0]), get_args(parts[0])
        if origin in (list, tuple, set, frozenset) and args:
            return "[]", [a for a in _non_none(args[0]) if _is_model(a)]
        if origin is dict and len(args) == 2:
            key = _KEY_PLACEHOLDERS.get(name, "<key>")
            return f".{key}", [a for a in _non_none(args[1]) if _is_model(a)]
    return "", [a for a in parts if _is_model(a)]


def _discriminator_value(model: type[BaseModel], discriminator: str) -> str:
    args = get_args(model.model_fields[discriminator].annotation)
    return str(args[0]) if args else model.__name__


def _walk(path: str, model: type[BaseModel], variant: str | None = None) -> Iterator[Any]:
    """Sections and unions in document order: a model's table, then its nested models."""
    yield _Section(path, model, variant)
    for name, field in model.model_fields.items():
        step, members = _nested(name, field.annotation)
        if not members:
            continue
        child = f"{path}.{name}{step}" if path else f"{name}{step}"
        if len(members) == 1:
            yield from _walk(child, members[0])
            continue
        discriminator = field.discriminator if isinstance(field.discriminator, str) else "name"
        default = _default_value(field)
        chosen = getattr(default, discriminator, None) if isinstance(default, BaseModel) else None
        yield _Union(child, discriminator, tuple(members), None if chosen is None else str(chosen))
        for member in members:
            yield from _walk(child, member, _discriminator_value(member, discriminator))


def _literal(value: Any) -> str:
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, float | int) and not isinstance(value, bool):
        return repr(value)
    return json.dumps(value, separators=(", ", ": "))


def _type_name(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(_literal(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None and args:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(map(_type_name, args))}]"
    if _is_model(annotation):
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " | ".join(_literal(m.value) for m in annotation)
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _constraints(field: FieldInfo) -> list[str]:
    found = []
    for meta in field.metadata:
        for attr, form in _CONSTRAINTS:
            value = getattr(meta, attr, None)
            if value is not None:
                found.append(form.format(value))
    return found


def _default_value(field: FieldInfo) -> Any:
    if field.default_factory is not None and field.default_factory_takes_validated_data:
        return PydanticUndefined  # depends on other fields: nothing static to show
    return field.get_default(call_default_factory=True)


def _default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "**required**"
    value = _default_value(field)
    if value is PydanticUndefined:
        return "computed"
    if isinstance(value, BaseModel):
        name = getattr(value, "name", None)
        return f"`name: {name}`" if isinstance(name, str) else "all defaults"
    return f"`{_literal(value)}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _describe(field: FieldInfo, members: list[type[BaseModel]]) -> str:
    if len(members) > 1:
        return "one of the variants below"
    base = _type_name(field.annotation)
    constraints = _constraints(field)
    return f"`{base}`" + (f" ({', '.join(constraints)})" if constraints else "")


def _table(section: _Section) -> list[str]:
    rows = ["| Field | Type | Default | Description |", "|---|---|---|---|"]
    for name, field in section.model.model_fields.items():
        step, members = _nested(name, field.annotation)
        path = f"{section.path}.{name}" if section.path else name
        description = field.description or ""
        if members:
            target = f"{path}{step}"
            description = f"{description}; see `{target}`" if description else f"see `{target}`"
        cells = (f"`{path}`", _describe(field, members), _default_text(field), description)
        rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return rows


def _doc(model: type[BaseModel]) -> str:
    doc = model.__doc__
    if not doc:
        return ""
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


def _union_intro(union: _Union) -> list[str]:
    names = ", ".join(f"`{_discriminator_value(m, union.discriminator)}`" for m in union.members)
    text = f"One of {len(union.members)} variants, chosen by `{union.discriminator}`: {names}."
    if union.default:
        text += f" Default: `{union.default}`."
    return [f"## `{union.path}`\n", text + "\n"]


def render_markdown(root: type[BaseModel] = GatewayConfig) -> str:
    """The whole reference for `root` (the routing YAML by default), ending with one newline."""
    lines = [_INTRO]
    for item in _walk("", root):
        if isinstance(item, _Union):
            lines.extend(_union_intro(item))
            continue
        if item.variant is not None:
            lines.append(f"### `{item.path}` with `name: {item.variant}`\n")
        else:
            lines.append(f"## `{item.path}`\n" if item.path else "## Top level\n")
        doc = _doc(item.model)
        if doc:
            lines.append(doc + "\n")
        lines.extend(_table(item))
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def main() -> int:
    sys.stdout.write(render_markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
