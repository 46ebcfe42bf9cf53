"""SD 1.x / 2.x UNets work through the UNet adapter (``sdxl``): same class, attention from level 0."""

from __future__ import annotations

import pytest
import torch

import tokenreduce as tr
from tokenreduce.testing.tiny_sdxl import tiny_sd1_inputs, tiny_sd1_unet

#: every call merges (the preset merges on some steps only; this test looks at single calls)
ALWAYS = {"name": "always"}


def run(unet, inputs) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs).sample


@pytest.mark.parametrize("sd2", [False, True], ids=["sd1", "sd2"])
@pytest.mark.parametrize("sites", [["stack"], ["attn1", "attn2", "ff"], ["block"]])
def test_sd1_and_sd2_unets_merge_and_restore(sd2: bool, sites: list[str]) -> None:
    unet, pristine = tiny_sd1_unet(sd2=sd2), tiny_sd1_unet(sd2=sd2)
    inputs = tiny_sd1_inputs(unet, batch=3)
    want = run(pristine, inputs)
    small_tiles = {"name": "tile", "size": [4, 4]}  # the mid block's grid is 4x4
    handle = tr.apply(
        unet,
        "toma-sdxl",
        adapter={"name": "sdxl", "sites": sites},
        partitioner=small_tiles,
        ratio=0.0,
        schedule=ALWAYS,
    )
    assert torch.equal(run(unet, inputs), want)
    handle = tr.apply(
        unet, "toma-sdxl", adapter={"name": "sdxl", "sites": sites}, partitioner=small_tiles, schedule=ALWAYS
    )
    # Level 0 is the full 16x16 latent (SDXL's first attention level is already downsampled 2x).
    assert {site.grid for site in handle.sites} == {(16, 16), (8, 8), (4, 4)}
    merged = run(unet, inputs)
    assert torch.isfinite(merged).all() and not torch.equal(merged, want)
    handle.remove()
    assert torch.equal(run(unet, inputs), want)
