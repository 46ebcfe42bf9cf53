"""Config loading (YAML, TOML, JSON, mappings), strict validation with readable errors, JSON schema."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import jsonschema
import pytest
import torch

import tokenreduce
from tokenreduce import hookimpl
from tokenreduce.builtins import AlwaysPolicy, GlobalPartitioner, GridSelector, HardMeanMerger, RandomSelector
from tokenreduce.config import ConfigBase, ConfigError, config_model, json_schema, load_config, resolve
from tokenreduce.interfaces import SelectContext, Selector
from tokenreduce.params import StrictParams
from tokenreduce.registry import Registry

BUILTIN_CONFIG: dict[str, Any] = {
    "ratio": 0.25,
    "seed": 7,
    "selector": {"name": "grid", "stride": [2, 3]},
    "merger": {"name": "hard_mean"},
    "partitioner": {"name": "stripe", "rows": 4},
    "reuse": {"name": "every_k", "k": 3, "sharing": "block"},
}

YAML = """\
ratio: 0.25
seed: 7
selector: {name: grid, stride: [2, 3]}
merger: {name: hard_mean}
partitioner:
  name: stripe
  rows: 4
reuse: {name: every_k, k: 3, sharing: block}
"""

TOML = """\
ratio = 0.25
seed = 7

[selector]
name = "grid"
stride = [2, 3]

[merger]
name = "hard_mean"

[partitioner]
name = "stripe"
rows = 4

[reuse]
name = "every_k"
k = 3
sharing = "block"
"""


@pytest.fixture(autouse=True)
def registry() -> Iterator[Registry]:
    yield tokenreduce.reset_manager(autoload=False).registry
    tokenreduce.reset_manager()


def _error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(data)
    return str(info.value)


def _with(**parts: Any) -> dict[str, Any]:
    return {**BUILTIN_CONFIG, **parts}


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize(
    ("suffix", "text"),
    [(".yaml", YAML), (".yml", YAML), (".toml", TOML), (".json", json.dumps(BUILTIN_CONFIG))],
)
def test_files_in_every_format_give_the_same_config(tmp_path: Path, suffix: str, text: str) -> None:
    path = tmp_path / f"config{suffix}"
    path.write_text(text, encoding="utf-8")
    from_file = load_config(path)
    assert from_file == load_config(str(path)) == load_config(BUILTIN_CONFIG)
    assert from_file.ratio == 0.25 and from_file.seed == 7
    assert from_file.selector.stride == [2, 3]
    assert from_file.partitioner.rows == 4
    assert (from_file.reuse.k, from_file.reuse.sharing) == (3, "block")


def test_a_config_resolves_to_component_instances() -> None:
    resolved = resolve(load_config(BUILTIN_CONFIG))
    assert (resolved.selector.name, resolved.merger.name, resolved.partitioner.name, resolved.reuse.name) == (
        "grid",
        "hard_mean",
        "stripe",
        "every_k",
    )
    assert resolved.reuse.sharing == "block"  # the parameter reaches the component
    assert resolved.selector.stride == (2, 3)


def test_a_config_round_trips_and_takes_overrides() -> None:
    config = load_config(BUILTIN_CONFIG)
    assert load_config(config) == config
    assert load_config(json.loads(config.model_dump_json())) == config
    assert load_config(config, ratio=0.5).ratio == 0.5
    assert load_config(BUILTIN_CONFIG, seed=3).seed == 3


def test_omitted_parameters_take_their_defaults() -> None:
    config = load_config(_with(partitioner={"name": "stripe"}, reuse={"name": "every_k"}))
    assert config.partitioner.rows == 8
    assert (config.reuse.k, config.reuse.sharing) == (5, "kind")


@pytest.mark.parametrize("ratio", [0, 0.0, 0.5, 0.999])
def test_ratios_in_range_are_accepted(ratio: float) -> None:
    config = load_config(_with(ratio=ratio))
    assert config.ratio == ratio and isinstance(config.ratio, float)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.yaml", "ratio: [0.5\n", "cannot parse"),
        ("bad.toml", "ratio = \n", "cannot parse"),
        ("bad.json", "{ratio: 0.5}", "cannot parse"),
        ("list.yaml", "- ratio: 0.5\n", "must be a mapping, got list"),
        ("config.ini", "[x]\n", "unsupported config format '.ini'"),
    ],
)
def test_unreadable_files_are_config_errors(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_a_missing_file_or_preset_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="neither a config file nor a preset"):
        load_config("no-such-preset")
    with pytest.raises(ConfigError, match="got int"):
        load_config(3)


# --------------------------------------------------------------------------- strict errors


def test_unknown_component_lists_the_valid_names(registry: Registry) -> None:
    message = _error(_with(selector={"name": "facility_locaton"}))
    assert (
        "selector: unknown selector 'facility_locaton' (did you mean 'facility_location'?); valid selectors:"
        in message
    )
    for name in registry.names("selector"):
        assert name in message
    message = _error(_with(merger={"name": "nope"}))
    assert all(name in message for name in registry.names("merger"))


def test_missing_name_lists_the_valid_names(registry: Registry) -> None:
    message = _error(_with(selector={"fraction": 0.5}))
    assert "selector: missing `name`" in message
    assert all(name in message for name in registry.names("selector"))


@pytest.mark.parametrize(
    ("part", "path"),
    [
        ({"partitioner": {"name": "stripe", "rows": "8"}}, "partitioner.rows"),
        ({"partitioner": {"name": "stripe", "rows": 8.0}}, "partitioner.rows"),
        ({"partitioner": {"name": "stripe", "rows": 0}}, "partitioner.rows"),
        ({"selector": {"name": "random", "fraction": "half"}}, "selector.fraction"),
        ({"selector": {"name": "random", "fraction": 1.5}}, "selector.fraction"),
        ({"selector": {"name": "grid", "stride": [2]}}, "selector.stride"),
        ({"selector": {"name": "grid", "stride": [2, 0]}}, "selector.stride.1"),
        ({"reuse": {"name": "every_k", "k": True}}, "reuse.k"),
        ({"reuse": {"name": "every_k", "sharing": "layer"}}, "reuse.sharing"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_wrong_parameter_types_and_values_name_the_field(part: dict[str, Any], path: str) -> None:
    message = _error(_with(**part))
    assert f"  - {path}: " in message
    # The discriminator tag pydantic inserts is not part of the path a user writes.
    kind = path.split(".")[0]
    name = part.get(kind, {}).get("name") if isinstance(part.get(kind), dict) else None
    if name:
        assert f"{kind}.{name}." not in message


@pytest.mark.parametrize(
    ("part", "path"),
    [
        ({"merger": {"name": "hard_mean", "temperature": 0.1}}, "merger.temperature"),
        ({"partitioner": {"name": "global", "rows": 4}}, "partitioner.rows"),
        ({"ratios": 0.5}, "ratios"),
    ],
)
def test_unknown_fields_are_rejected(part: dict[str, Any], path: str) -> None:
    message = _error(_with(**part))
    assert f"  - {path}: " in message and "Extra inputs are not permitted" in message


@pytest.mark.parametrize("ratio", [1, 1.0, 1.5, -0.1, True, False, "0.5", None, float("nan")])
def test_ratio_must_be_a_number_in_range(ratio: object) -> None:
    message = _error(_with(ratio=ratio))
    assert "  - ratio: " in message and "[0, 1)" in message


def test_every_problem_is_reported_at_once() -> None:
    message = _error(
        _with(ratio=2.0, partitioner={"name": "stripe", "rows": "x"}, reuse={"name": "every_k", "k": 0})
    )
    assert message.startswith("invalid config (3 problems)")
    assert all(f"  - {path}: " in message for path in ("ratio", "partitioner.rows", "reuse.k"))


class _PickyParams(StrictParams):
    name: Literal["picky"] = "picky"


class _PickySelector(Selector):
    """Refuses to work with any merger but ``identity`` (a cross-component rule)."""

    name = "picky"
    Params = _PickyParams

    def check(self, config: ConfigBase) -> None:
        if config.merger.name != "identity":  # type: ignore[attr-defined]
            raise ValueError(f"needs merger 'identity', got {config.merger.name!r}")  # type: ignore[attr-defined]

    def select(self, features: torch.Tensor, ctx: SelectContext) -> torch.Tensor:
        return torch.zeros(ctx.layout.regions.num_regions, ctx.layout.k, dtype=torch.long)


class _PickyPlugin:
    @hookimpl
    def tokenreduce_register(self, registry: Registry) -> None:
        registry.add(_PickySelector)


def test_component_checks_reject_incompatible_combinations() -> None:
    tokenreduce.register_plugin(_PickyPlugin(), source="picky-dist")
    with pytest.raises(
        ConfigError, match="cannot combine:\n  - selector 'picky': needs merger 'identity', got 'hard_mean'"
    ):
        load_config(_with(selector={"name": "picky"}))
    assert (
        load_config(_with(selector={"name": "picky"}, merger={"name": "identity"})).selector.name == "picky"
    )


def test_every_registered_preset_is_a_valid_config(registry: Registry) -> None:
    for name in registry.presets:
        assert isinstance(load_config(name), ConfigBase), name


def test_a_new_registry_gets_its_own_model() -> None:
    """Registries with the same number of components but different ones never share a cached model."""
    data = {"selector": {"name": "grid"}, "merger": {"name": "hard_mean"}, "partitioner": {"name": "global"}}
    for _ in range(5):
        first = Registry()
        for cls in (RandomSelector, HardMeanMerger, GlobalPartitioner, AlwaysPolicy):
            first.add(cls)
        config_model(first)
        del first  # its id is free for the next registry
        second = Registry()
        for cls in (GridSelector, HardMeanMerger, GlobalPartitioner, AlwaysPolicy):
            second.add(cls)
        assert (
            config_model(second).model_validate({**data, "reuse": {"name": "always"}}).selector.name == "grid"
        )


# --------------------------------------------------------------------------- JSON schema


def _consts(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        if isinstance(node.get("const"), str):
            found.add(node["const"])
        found.update(v for v in node.get("enum", []) if isinstance(v, str))
        for value in node.values():
            found |= _consts(value)
    elif isinstance(node, list):
        for value in node:
            found |= _consts(value)
    return found


def test_json_schema_is_valid_and_names_every_component(registry: Registry) -> None:
    schema = json_schema()
    assert isinstance(schema, dict)
    jsonschema.Draft202012Validator.check_schema(schema)
    names = _consts(schema)
    for kind in ("selector", "merger", "partitioner", "reuse", "adapter"):
        for name in registry.names(kind):
            assert name in names, f"{kind} {name!r} missing from the schema"
    assert json.loads(json.dumps(schema)) == schema  # plain JSON


def test_json_schema_accepts_valid_configs_and_rejects_invalid_ones() -> None:
    validator = jsonschema.Draft202012Validator(json_schema())
    assert not list(validator.iter_errors(load_config(BUILTIN_CONFIG).model_dump(mode="json")))
    assert list(validator.iter_errors(_with(merger={"name": "hard_mean", "temperature": 0.1})))
    assert list(validator.iter_errors(_with(partitioner={"name": "stripe", "rows": 0})))
    assert list(validator.iter_errors(_with(selector={"name": "no_such_selector"})))
