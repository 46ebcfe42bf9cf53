"""A markdown reference of every registered component and its parameters (from the pydantic models)."""

from __future__ import annotations

import types
import typing
from typing import Any

from tokenreduce.registry import KINDS, Registry

TITLES = {
    "adapter": "Model adapters (`adapter:`)",
    "selector": "Selectors (`selector:`)",
    "merger": "Mergers (`merger:`)",
    "partitioner": "Partitioners (`partitioner:`)",
    "reuse": "Reuse policies (`reuse:`)",
    "schedule": "Merge schedules (`schedule:`)",
}


def _type_name(annotation: Any) -> str:
    """``Literal['a', 'b']`` -> ``'a' | 'b'``; ``Optional[int]`` -> ``int | None``; ``list[int]`` as is."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:  # constraints are in the description and the JSON schema
        return _type_name(args[0])
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    return "None" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        return repr(field.default_factory())
    return repr(field.default)


def markdown_reference(registry: Registry) -> str:
    lines: list[str] = []
    for kind in KINDS:
        lines += [f"### {TITLES[kind]}", ""]
        for name, entry in sorted(registry.components[kind].items()):
            doc = (entry.cls.__doc__ or "").strip().splitlines()
            lines.append(f"**`{name}`** ({entry.source}){': ' + doc[0] if doc else ''}")
            lines.append("")
            fields = {k: v for k, v in entry.cls.Params.model_fields.items() if k != "name"}
            if fields:
                lines += ["| parameter | type | default | meaning |", "| --- | --- | --- | --- |"]
                for field_name, field in fields.items():
                    description = (field.description or "").replace("|", "\\|")
                    lines.append(
                        f"| `{field_name}` | `{_type_name(field.annotation)}` | `{_default(field)}` | {description} |"
                    )
                lines.append("")
    lines += ["### Presets", "", "| preset | from | what it is |", "| --- | --- | --- |"]
    for name, preset in sorted(registry.presets.items()):
        lines.append(f"| `{name}` | {preset.source} | {preset.description} |")
    return "\n".join(lines) + "\n"
