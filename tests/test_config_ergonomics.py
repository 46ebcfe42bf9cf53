"""Configs for people: merged overrides, the adapter's default preset, did-you-mean, numpy/torch numbers,
and ``validate`` running every check ``explain`` runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import tokenreduce as tr
from tokenreduce.cli import main
from tokenreduce.config import ConfigError, load_config
from tokenreduce.registry import UnknownComponentError
from tokenreduce.testing.tiny_flux import tiny_flux_transformer
from tokenreduce.testing.tiny_sdxl import tiny_sdxl_unet
from tokenreduce.toma_plugin.attention_merger import AttentionMerger


@pytest.fixture(autouse=True)
def fresh_registry():
    tr.reset_manager()
    yield
    tr.reset_manager()


def without(config, kind: str, field: str) -> dict:
    data = config.model_dump()
    del data[kind][field]
    return data


# --------------------------------------------------------------------------- overrides


def test_component_overrides_merge_into_the_preset_entry() -> None:
    preset = load_config("toma-sdxl")
    tuned = load_config("toma-sdxl", merger={"temperature": 0.01}, reuse={"weights_every": 2})
    assert tuned.merger.name == preset.merger.name == "attention"
    assert tuned.merger.temperature == 0.01 != preset.merger.temperature
    assert tuned.reuse.weights_every == 2
    assert tuned.reuse.destinations_every == preset.reuse.destinations_every
    assert without(tuned, "merger", "temperature") == without(
        preset.model_copy(update={"reuse": tuned.reuse}), "merger", "temperature"
    )
    # The same override on the preset's own name, and nested into the adapter entry.
    assert load_config("toma-sdxl", merger={"name": "attention", "temperature": 0.01}) == load_config(
        "toma-sdxl", merger={"temperature": 0.01}
    )
    assert load_config("toma-sdxl", adapter={"levels": [0]}).adapter.sites == preset.adapter.sites


def test_an_override_naming_another_component_replaces_the_entry() -> None:
    replaced = load_config("toma-sdxl", merger={"name": "hard_mean"})
    assert replaced.merger.name == "hard_mean"
    assert replaced.merger == load_config({"merger": {"name": "hard_mean"}}).merger


def test_apply_takes_a_merged_override() -> None:
    model = tiny_flux_transformer()
    with tr.apply(model, "toma-flux", merger={"temperature": 0.01}) as handle:
        assert handle.config.merger.temperature == 0.01
        assert handle.config.partitioner == load_config("toma-flux").partitioner


# --------------------------------------------------------------------------- default preset


def test_apply_without_a_config_uses_the_adapters_default_preset() -> None:
    flux = tiny_flux_transformer()
    with tr.apply(flux) as handle:
        assert handle.config == load_config("toma-flux")
    unet = tiny_sdxl_unet(seed=0, sample_size=32)  # grids 16x16 and 8x8: the preset's 8x8 tiles fit
    with tr.apply(unet, ratio=0.25) as handle:
        assert handle.config == load_config("toma-sdxl", ratio=0.25)
    with pytest.raises(tr.UnsupportedModelError, match="no adapter supports Linear"):
        tr.apply(torch.nn.Linear(2, 2))


# --------------------------------------------------------------------------- did you mean


@pytest.mark.parametrize(
    ("data", "hint"),
    [
        ({"merger": {"name": "attention", "temprature": 0.01}}, "did you mean 'temperature'?"),
        ({"ratoi": 0.5}, "did you mean 'ratio'?"),
        ({"selector": {"name": "facility_locaton"}}, "did you mean 'facility_location'?"),
        ({"adapter": {"name": "sdxl", "level": [0]}}, "did you mean 'levels'?"),
    ],
)
def test_unknown_fields_and_names_suggest_the_closest(data: dict, hint: str) -> None:
    with pytest.raises(ConfigError, match=hint):
        load_config(data)


def test_unknown_fields_list_what_is_allowed() -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"merger": {"name": "attention", "temprature": 0.01}})
    assert f"allowed: {', '.join(AttentionMerger.Params.model_fields)}" in str(info.value)


def test_unknown_presets_and_registry_names_suggest_the_closest() -> None:
    with pytest.raises(ConfigError, match="did you mean 'toma-sdxl'"):
        load_config("toma-sdx")
    with pytest.raises(UnknownComponentError, match="did you mean 'attention'"):
        tr.get_registry().get("merger", "atention")


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    "ratio", [np.float32(0.5), np.float64(0.5), np.array(0.5), torch.tensor(0.5), torch.tensor(0.5).half()]
)
def test_numpy_and_torch_scalars_are_numbers(ratio) -> None:
    config = load_config(
        "toma-sdxl",
        ratio=ratio,
        seed=np.int64(3),
        merger={"temperature": np.float32(0.25)},
        partitioner={"size": [np.int64(4), torch.tensor(4)]},
    )
    assert config.ratio == 0.5 and type(config.ratio) is float
    assert config.seed == 3 and type(config.seed) is int
    assert config.merger.temperature == 0.25
    assert config.partitioner.size == [4, 4]
    assert AttentionMerger.Params(temperature=np.float32(0.5)).temperature == 0.5


@pytest.mark.parametrize("ratio", [torch.tensor([0.5]), np.array([0.5]), np.bool_(True), torch.tensor(1.5)])
def test_arrays_and_bad_scalars_are_still_refused(ratio) -> None:
    with pytest.raises(ConfigError, match="ratio"):
        load_config("toma-sdxl", ratio=ratio)


# --------------------------------------------------------------------------- validate = explain's checks


@pytest.mark.parametrize(
    ("text", "arch", "message"),
    [
        ("adapter: {name: sdxl, levels: [5]}\n", [], "levels [5] do not exist"),
        ("adapter: {name: flux}\npartitioner: {name: tile, size: [80, 80]}\n", [], "(64x64) is smaller"),
        ("adapter: {name: auto}\npartitioner: {name: tile, size: [80, 80]}\n", ["--arch", "flux"], "smaller"),
    ],
)
def test_validate_runs_the_architecture_checks_of_explain(
    tmp_path: Path, capsys, text: str, arch: list[str], message: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    errors = []
    for command in ("validate", "explain"):
        assert main([command, str(path), *arch]) == 2
        errors.append(capsys.readouterr().err)
    assert message in errors[0]
    assert errors[0] == errors[1]
