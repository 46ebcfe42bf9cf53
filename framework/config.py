"""Configuration: strict pydantic models built from the registry, loaders and the JSON schema.

A config names one adapter, one ratio and one entry per component kind, each ``{name: ...,
<params>}`` validated against that plugin's ``Params``::

    adapter: {name: sdxl, sites: [block]}
    ratio: 0.5
    selector: {name: facility_location}
    merger: {name: attention, temperature: 0.001}
    partitioner: {name: tile, size: [8, 8]}
    reuse: {name: step_sharing, destinations_every: 10, weights_every: 5}
    schedule: {name: every, k: 3}       # which denoising steps merge at all (default: always)
"""

from __future__ import annotations

import difflib
import json
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, overload

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from tokenreduce.interfaces import (
    Component,
    Merger,
    MergeSchedule,
    ModelAdapter,
    Partitioner,
    ReusePolicy,
    Selector,
)
from tokenreduce.manager import get_registry
from tokenreduce.params import AdapterParams, StrictParams, plain_numbers
from tokenreduce.registry import Registry, UnknownComponentError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

COMPONENT_FIELDS = ("selector", "merger", "partitioner", "reuse", "schedule")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the bad field and what is allowed."""


class AutoAdapterParams(AdapterParams):
    """Pick the adapter whose ``matches`` accepts the model (adapter defaults, plus the parameters
    every adapter has)."""

    name: Literal["auto"] = "auto"


class ConfigBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, strict=True)

    ratio: float = Field(0.5, description="Fraction of image tokens removed per merged layer, in [0, 1).")
    seed: int = Field(
        0, description="Seed of the dedicated generator of random selectors and of selector noise (jitter)."
    )
    features: Literal["float32", "model"] = Field(
        "model",
        description=(
            "Precision of the token features selectors and mergers compare: 'float32' (a float32 copy of "
            "the tokens), or 'model' (the model's dtype, with float32 norms and sums: no copy)."
        ),
    )

    if TYPE_CHECKING:  # the component fields the registry adds to each concrete config model
        adapter: AdapterParams
        selector: StrictParams
        merger: StrictParams
        partitioner: StrictParams
        reuse: StrictParams
        schedule: StrictParams

    @model_validator(mode="before")
    @classmethod
    def _plain_numbers(cls, data: Any) -> Any:
        return plain_numbers(data) if isinstance(data, dict) else data

    @field_validator("ratio", mode="before")
    @classmethod
    def _check_ratio(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"ratio must be a number in [0, 1), got {value!r}")
        if not 0.0 <= float(value) < 1.0:
            raise ValueError(f"ratio must be in [0, 1) (fraction of tokens removed), got {value}")
        return float(value)


_DEFAULTS = {
    "adapter": {"name": "auto"},
    "selector": {"name": "facility_location"},
    "merger": {"name": "attention"},
    "partitioner": {"name": "tile"},
    "reuse": {"name": "step_sharing"},
    "schedule": {"name": "always"},
}

# id(registry) -> (weak reference to it, component count, model). The reference guards against a
# new registry that reuses the id of a collected one.
_model_cache: dict[int, tuple[weakref.ref, int, type[ConfigBase]]] = {}


def did_you_mean(word: Any, choices: Any) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _union(registry: Registry, kind: str, extra: tuple[type[StrictParams], ...] = ()) -> Any:
    params = tuple(e.cls.Params for e in registry.components[kind].values()) + extra
    if not params:
        raise ConfigError(f"no {kind} is registered")
    if len(params) == 1:
        return params[0]
    return Annotated[Union[params], Field(discriminator="name")]  # noqa: UP007 - dynamic union


def config_model(registry: Registry | None = None) -> type[ConfigBase]:
    """The top-level config model for the components registered now."""
    registry = registry or get_registry()
    stamp = sum(len(t) for t in registry.components.values())
    cached = _model_cache.get(id(registry))
    if cached and cached[0]() is registry and cached[1] == stamp:
        return cached[2]
    fields: dict[str, Any] = {
        "adapter": (_union(registry, "adapter", (AutoAdapterParams,)), Field(default=_DEFAULTS["adapter"])),
    }
    for kind in COMPONENT_FIELDS:
        if registry.components[kind]:
            fields[kind] = (_union(registry, kind), Field(default=_DEFAULTS[kind]))
    model = create_model("Config", __base__=ConfigBase, **fields)
    _model_cache[id(registry)] = (weakref.ref(registry), stamp, model)
    return model


def json_schema(registry: Registry | None = None) -> dict[str, Any]:
    schema = config_model(registry).model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "tokenreduce config"
    return schema


# --------------------------------------------------------------------------- loading


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    return parse_config_text(text, path.suffix.lower(), origin=str(path))


def parse_config_text(text: str, suffix: str, origin: str = "<config>") -> dict[str, Any]:
    try:
        if suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(
                f"{origin}: unsupported config format {suffix!r}; use .yaml, .yml, .toml or .json"
            )
    except (yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{origin}: cannot parse: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: a config must be a mapping, got {type(data).__name__}")
    return data


def load_config(source: Any, registry: Registry | None = None, **overrides: Any) -> ConfigBase:
    """A validated config from a config object, a mapping, a file path or a preset name.

    ``overrides`` set top-level fields (e.g. ``ratio=0.25``); a mapping for a component entry is
    merged into it (``merger={"temperature": 0.01}`` keeps the merger's name and other parameters)
    unless it names a different component, which replaces the entry.
    """
    registry = registry or get_registry()
    model = config_model(registry)
    if isinstance(source, ConfigBase):
        data = source.model_dump()
    elif isinstance(source, dict):
        data = dict(source)
    elif isinstance(source, str | Path):
        text = str(source)
        if text in registry.presets:
            preset = registry.presets[text]
            data = parse_config_text(
                preset.read_text(), Path(preset.resource).suffix, origin=f"preset {text!r}"
            )
        elif Path(text).suffix.lower() in (".yaml", ".yml", ".toml", ".json") or Path(text).exists():
            data = read_config_file(text)
        else:
            presets = ", ".join(sorted(registry.presets)) or "(none)"
            raise ConfigError(
                f"{text!r} is neither a config file nor a preset{did_you_mean(text, registry.presets)}; "
                f"presets: {presets}"
            )
    else:
        raise ConfigError(
            f"a config must be a preset name, a path, a mapping or a Config, got {type(source).__name__}"
        )
    for key, value in overrides.items():
        data[key] = merge_entry(data.get(key, _DEFAULTS.get(key)), value)
    try:
        config = model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(render_validation_error(exc, registry)) from None
    check_combination(config, registry)
    return config


def merge_entry(base: Any, override: Any) -> Any:
    """``override`` merged into ``base`` when both are mappings for the same component (a missing
    ``name`` counts as the same); otherwise ``override``."""
    if not (isinstance(base, dict) and isinstance(override, dict)):
        return override
    if "name" in override and "name" in base and override["name"] != base["name"]:
        return override
    merged = dict(base)
    for key, value in override.items():
        merged[key] = merge_entry(merged.get(key), value) if key != "name" else value
    return merged


def render_validation_error(exc: ValidationError, registry: Registry) -> str:
    lines = [f"invalid config ({exc.error_count()} problem{'s' if exc.error_count() != 1 else ''}):"]
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        msg = err["msg"]
        if err["type"] == "union_tag_invalid" and loc:
            kind = loc[0]
            names = registry.names(kind) + (["auto"] if kind == "adapter" else [])
            name = err["input"].get("name")
            msg = f"unknown {kind} {name!r}{did_you_mean(name, names)}; valid {kind}s: {', '.join(sorted(names))}"
            if registry.failed:
                msg += "; plugins that failed to load: " + "; ".join(
                    f"{k}: {v}" for k, v in registry.failed.items()
                )
        elif err["type"] == "union_tag_not_found":
            msg = f"missing `name`; valid: {', '.join(registry.names(loc[0]))}" if loc else msg
        elif err["type"] == "extra_forbidden" and loc:
            allowed = _allowed_fields(loc, registry)
            if allowed:
                msg += f"{did_you_mean(loc[-1], allowed)}; allowed: {', '.join(allowed)}"
        # Drop the discriminator tag pydantic inserts into the location.
        path = ".".join(
            p
            for i, p in enumerate(loc)
            if not (i == 1 and loc[0] in _DEFAULTS and p in _names(registry, loc[0]))
        )
        lines.append(f"  - {path or '<root>'}: {msg}")
    return "\n".join(lines)


def _allowed_fields(loc: list[str], registry: Registry) -> list[str]:
    """The fields of the model that holds the unknown field at ``loc`` (top level or one component)."""
    if len(loc) == 1:
        return list(config_model(registry).model_fields)
    kind = loc[0]
    if kind not in _DEFAULTS:
        return []
    names = _names(registry, kind)
    if len(loc) == 3 and loc[1] in names:
        name = loc[1]
    elif len(loc) == 2 and len(names) == 1:  # a union of one: pydantic adds no tag
        (name,) = names
    else:
        return []
    params = AutoAdapterParams if name == "auto" else registry.get(kind, name).Params
    return list(params.model_fields)


def _names(registry: Registry, kind: str) -> set[str]:
    return set(registry.names(kind)) | ({"auto"} if kind == "adapter" else set())


# --------------------------------------------------------------------------- resolution


@dataclass(frozen=True)
class Resolved:
    """A config turned into component instances (what the engine runs)."""

    config: ConfigBase
    selector: Selector
    merger: Merger
    partitioner: Partitioner
    reuse: ReusePolicy
    adapter: ModelAdapter | None  # None while the adapter is "auto" and no model is known
    schedule: MergeSchedule | None = None  # None: merge at every step


@overload
def instantiate(
    kind: Literal["partitioner"], params: StrictParams, registry: Registry | None = None
) -> Partitioner: ...
@overload
def instantiate(
    kind: Literal["selector"], params: StrictParams, registry: Registry | None = None
) -> Selector: ...
@overload
def instantiate(
    kind: Literal["merger"], params: StrictParams, registry: Registry | None = None
) -> Merger: ...
@overload
def instantiate(
    kind: Literal["reuse"], params: StrictParams, registry: Registry | None = None
) -> ReusePolicy: ...
@overload
def instantiate(
    kind: Literal["schedule"], params: StrictParams, registry: Registry | None = None
) -> MergeSchedule: ...
@overload
def instantiate(
    kind: Literal["adapter"], params: StrictParams, registry: Registry | None = None
) -> ModelAdapter: ...
@overload
def instantiate(kind: str, params: StrictParams, registry: Registry | None = None) -> Component: ...
def instantiate(kind: str, params: StrictParams, registry: Registry | None = None) -> Component:
    registry = registry or get_registry()
    try:
        cls = registry.get(kind, params.name)
    except UnknownComponentError as exc:
        raise ConfigError(str(exc)) from None
    return cls(params)


def resolve(
    config: ConfigBase, registry: Registry | None = None, adapter: ModelAdapter | None = None
) -> Resolved:
    registry = registry or get_registry()
    # A registry without schedules (a plugin's own test registry) makes configs without `schedule`.
    fields = type(config).model_fields
    parts = {
        kind: instantiate(kind, getattr(config, kind), registry)
        for kind in COMPONENT_FIELDS
        if kind in fields
    }
    if adapter is None and config.adapter.name != "auto":
        adapter = instantiate("adapter", config.adapter, registry)
    return Resolved(config=config, adapter=adapter, **parts)  # type: ignore[arg-type]


def check_combination(config: ConfigBase, registry: Registry | None = None) -> None:
    """Raise :class:`ConfigError` naming the conflict if the components cannot work together."""
    resolved = resolve(config, registry)
    problems = []
    for component in (
        resolved.selector,
        resolved.merger,
        resolved.partitioner,
        resolved.reuse,
        resolved.schedule,
        resolved.adapter,
    ):
        if component is None:
            continue
        try:
            component.check(config)
        except ValueError as exc:
            problems.append(f"{component.kind} {component.name!r}: {exc}")
    if getattr(config.adapter, "size_weighting", False) and not resolved.merger.gives_sizes:
        problems.append(
            f"adapter {config.adapter.name!r}: size_weighting needs group sizes, which merger "
            f"{resolved.merger.name!r} does not give; use a merger that does ("
            + ", ".join(sorted(n for n in registry_names_giving_sizes(registry)))
            + ") or set size_weighting: false"
        )
    if problems:
        raise ConfigError("components cannot combine:\n" + "\n".join(f"  - {p}" for p in problems))


def registry_names_giving_sizes(registry: Registry | None = None) -> list[str]:
    """Registered mergers whose plans give group sizes (``Merger.gives_sizes``)."""
    registry = registry or get_registry()
    return [
        name
        for name, entry in registry.components["merger"].items()
        if issubclass(entry.cls, Merger) and entry.cls.gives_sizes
    ]
