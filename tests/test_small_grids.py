"""Grids too small for a tile: refused at apply time at the default size, left unmerged at run time."""

from __future__ import annotations

import warnings

import pytest
import torch

import tokenreduce as tr
from tokenreduce.testing.tiny_flux import tiny_flux_inputs, tiny_flux_transformer
from tokenreduce.testing.tiny_sdxl import tiny_sdxl_inputs, tiny_sdxl_unet


@pytest.fixture(autouse=True)
def fresh_registry():
    tr.reset_manager()


def sdxl_config(**adapter) -> dict:
    """4x4 tiles: they fit the tiny UNet's default grids (8x8 and 4x4), not smaller ones."""
    return {
        "adapter": {"name": "sdxl", **adapter},
        "partitioner": {"name": "tile", "size": [4, 4]},
        "reuse": {"name": "step_sharing", "destinations_every": 1, "weights_every": 1},
    }


def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


def small_grid_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "smaller than partitioner" in str(w.message)]


def test_sdxl_levels_too_small_at_run_time_are_left_unmerged_with_one_warning_each() -> None:
    unet = tiny_sdxl_unet(seed=0, sample_size=16)
    tiny = tiny_sdxl_inputs(unet, batch=1, height=4, width=4)  # levels on 2x2 and 1x1 grids
    mixed = tiny_sdxl_inputs(unet, batch=1, height=8, width=8)  # 4x4 (fits) and 2x2
    reference = run(unet, tiny)
    with tr.apply(unet, sdxl_config(levels=[0])):
        level0_only = run(unet, mixed)
    with tr.apply(unet, sdxl_config()), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert torch.equal(run(unet, tiny), reference)  # nothing merged, exactly the model
        run(unet, tiny)
        partly = run(unet, mixed)
        run(unet, mixed)
    messages = small_grid_warnings(caught)
    assert len(messages) == 2, messages  # 2x2 and 1x1 once each, over four calls and two sizes
    assert {m.split(" is smaller")[0] for m in messages} == {"token grid 2x2", "token grid 1x1"}
    assert "needs (4x4 on its last 2 axes)" in messages[0]
    assert torch.equal(partly, level0_only)  # the level that fits is merged, the other is not


def test_sdxl_grid_too_small_at_the_default_size_is_refused_at_apply() -> None:
    unet = tiny_sdxl_unet(seed=0, sample_size=16)
    config = sdxl_config() | {"partitioner": {"name": "tile", "size": [8, 8]}}
    with pytest.raises(tr.ConfigError, match=r"level1 \(4x4\) is smaller than partitioner 'tile' needs"):
        tr.apply(unet, config)
    assert tr.get_handle(unet) is None
    with tr.apply(unet, config, adapter={"name": "sdxl", "levels": [0]}):  # the level that fits
        pass


def test_flux_grid_too_small_at_run_time_runs_unmerged() -> None:
    model = tiny_flux_transformer()
    small = tiny_flux_inputs(model, height_tokens=2, width_tokens=3)
    reference = run(model, small)
    with (
        tr.apply(model, "toma-flux", schedule={"name": "always"}),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        assert torch.equal(run(model, small), reference)
        run(model, small)
    messages = small_grid_warnings(caught)
    assert len(messages) == 1 and messages[0].startswith("token grid 2x3"), messages


def test_flux_default_size_is_checked_at_apply() -> None:
    model = tiny_flux_transformer()
    with pytest.raises(
        tr.ConfigError,
        match=r"\(64x64\) is smaller than partitioner 'tile' needs \(80x80 on its last 2 axes\)",
    ):
        tr.apply(model, "toma-flux", partitioner={"name": "tile", "size": [80, 80]})
    assert tr.get_handle(model) is None
