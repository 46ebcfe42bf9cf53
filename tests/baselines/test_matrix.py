"""Every registered selector x merger x partitioner, on the tiny SDXL UNet and the tiny Flux transformer.

The components come from a fresh registry, so a new plugin joins the matrix automatically. A
combination either validates (config checks plus the runtime's layout check for the model's
grids) and then runs one call with finite outputs, or it fails at validation with a message
that names the components in conflict.

Ratio 0.75 is the one value every built-in family can agree on at the 8x8 grids used here
(ToDo's factor 2, and one token per 2x2 cell for grid selectors feeding one-token-per-destination
mergers), so most combinations validate and the failures are genuine incompatibilities.
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch

import tokenreduce as tr
from tokenreduce.config import ConfigError
from tokenreduce.testing.strategies import example_params
from tokenreduce.testing.tiny_flux import tiny_flux_inputs, tiny_flux_transformer
from tokenreduce.testing.tiny_sdxl import tiny_sdxl_inputs, tiny_sdxl_unet
from tokenreduce.testing.tiny_wan import tiny_wan_inputs, tiny_wan_transformer

RATIO = 0.75
REGISTRY = tr.reset_manager().registry
COMBOS = list(
    itertools.product(REGISTRY.names("selector"), REGISTRY.names("merger"), REGISTRY.names("partitioner"))
)

#: adapter params per model: grids known at validation (SDXL: the 8x8 level only; Flux: an 8x8 grid)
ADAPTERS = {
    "sdxl": {"name": "sdxl", "sites": ["attn1"], "levels": [0]},
    "flux": {"name": "flux", "grid": [8, 8]},
}


@pytest.fixture(scope="module")
def models():
    tr.reset_manager()
    unet = tiny_sdxl_unet(seed=0, sample_size=16)  # level 0 is an 8x8 token grid
    flux = tiny_flux_transformer(seed=0)
    wan = tiny_wan_transformer(seed=0, num_layers=2)
    return {
        "sdxl": (unet, tiny_sdxl_inputs(unet, batch=2)),
        "flux": (flux, tiny_flux_inputs(flux, batch=1, height_tokens=8, width_tokens=8)),
        "wan": (wan, tiny_wan_inputs(wan, batch=1)),  # one sample per call, as Wan's pipeline calls it
    }


def component(kind: str, name: str) -> dict:
    return example_params(REGISTRY.get(kind, name)).model_dump()


def config(adapter: str, selector: str, merger: str, partitioner: str) -> dict:
    return {
        "adapter": ADAPTERS[adapter],
        "ratio": RATIO,
        "selector": component("selector", selector),
        "merger": component("merger", merger),
        "partitioner": component("partitioner", partitioner),
        "reuse": {"name": "always"},
    }


def named(message: str, names: dict[str, str]) -> set[str]:
    """The kinds whose component is named (quoted) in ``message``."""
    return {kind for kind, name in names.items() if re.search(rf"'{re.escape(name)}'", message)}


def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.sample if hasattr(out, "sample") else out[0]


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_every_combination_runs_or_fails_at_validation(models, adapter) -> None:
    tr.reset_manager()
    model, inputs = models[adapter]
    ran, refused = [], []
    for selector, merger, partitioner in COMBOS:
        cfg = config(adapter, selector, merger, partitioner)
        try:
            handle = tr.apply(model, cfg)
        except ConfigError as exc:
            message = str(exc)
            names = {"selector": selector, "merger": merger, "partitioner": partitioner, "adapter": adapter}
            involved = named(message, names)
            assert len(involved) >= 2, f"{selector}/{merger}/{partitioner} on {adapter}: {message}"
            refused.append((selector, merger, partitioner))
            continue
        try:
            out = run(model, inputs)
        finally:
            handle.remove()
        assert torch.isfinite(out).all(), f"{selector}/{merger}/{partitioner} on {adapter}: non-finite output"
        ran.append((selector, merger, partitioner))
    # The matrix must exercise real merging, not only refusals.
    assert len(ran) >= len(COMBOS) // 2, f"only {len(ran)} of {len(COMBOS)} combinations ran on {adapter}"
    assert ("tomesd_grid", "attention", "global") in ran  # one token per 2x2 cell = ratio 0.75
    if adapter == "sdxl":
        assert {("tomesd_grid", "bipartite", "global"), ("random", "downsample", "global")} <= set(ran)
        assert ("random", "downsample", "tile") in refused
    else:
        assert ("tomesd_grid", "bipartite", "global") in refused  # per-sample matching vs Flux RoPE
        assert not any(m == "downsample" for _, m, _ in ran)


#: Every preset the baseline plugins ship, with the model its adapter patches.
BASELINE_PRESETS = {
    name: tr.load_config(name).adapter.name
    for name in tr.reset_manager().registry.presets
    if not name.startswith("toma")
}


def test_every_adapter_of_a_baseline_preset_has_a_model() -> None:
    assert set(BASELINE_PRESETS.values()) == {"sdxl", "flux", "wan"}
    assert {"tomesd-wan", "tofu-wan"} <= set(BASELINE_PRESETS)


@pytest.mark.parametrize("preset", sorted(BASELINE_PRESETS))
def test_baseline_presets_run(models, preset) -> None:
    tr.reset_manager()
    model, inputs = models[BASELINE_PRESETS[preset]]
    baseline = run(model, inputs)
    with tr.apply(model, preset):
        out = run(model, inputs)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, baseline, atol=1e-5), f"{preset} changed nothing"
    assert torch.equal(run(model, inputs), baseline)
