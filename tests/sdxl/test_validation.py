"""Bad input is refused before anything is patched."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import tokenreduce as tr
from tokenreduce.plugins.sdxl import SDXLAdapter
from tokenreduce.testing.tiny_sdxl import tiny_sdxl_inputs

from .conftest import config, run, wrapped

BAD_CONFIGS = {
    "unknown plugin": (config(selector={"name": "no_such_selector"}), "unknown selector 'no_such_selector'"),
    "ratio 1.0": (config(ratio=1.0), "ratio must be in [0, 1)"),
    "tile larger than the grid": (config(partitioner={"name": "tile", "size": [8, 8]}), "smaller than"),
    "kv_only merger with ff": (
        config(
            ["attn1", "ff"],
            ratio=0.75,
            merger={"name": "downsample"},
            partitioner={"name": "global"},
            reuse={"name": "always"},
        ),
        "use sites ['attn1']",
    ),
    "block mixed with attn1": (config(["block", "attn1"]), "use it alone"),
    "site listed twice": (config(["ff", "ff"]), "twice"),
    "unknown site": (config(["norm1"]), "attn1"),
    "unknown level": (config(adapter={"levels": [2]}), "levels [2] do not exist"),
    "no level selected": (config(adapter={"max_downsample": 1}), "select no transformer block"),
    "filters exclude each other": (
        config(adapter={"levels": [1], "max_downsample": 2}),
        "select no transformer block",
    ),
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_config_is_refused_before_patching(unet, name):
    cfg, message = BAD_CONFIGS[name]
    inputs = tiny_sdxl_inputs(unet, batch=1, seed=0)
    reference = run(unet, inputs)
    with pytest.raises(tr.ConfigError, match=re.escape(message)):
        tr.apply(unet, cfg)
    assert wrapped(unet) == set()
    assert tr.get_handle(unet) is None
    assert torch.equal(run(unet, inputs), reference)


def test_level_errors_list_the_existing_levels(unet):
    with pytest.raises(tr.ConfigError) as info:
        tr.apply(unet, config(adapter={"levels": [3]}))
    message = str(info.value)
    assert "0 (downsample 2, 8x8 tokens, 3 blocks)" in message
    assert "1 (downsample 4, 4x4 tokens, 8 blocks)" in message


def test_not_a_unet():
    linear = nn.Linear(4, 4)
    with pytest.raises(tr.UnsupportedModelError):
        tr.apply(linear, config())
    with pytest.raises(tr.UnsupportedModelError):
        tr.apply(linear, "toma")  # automatic adapter choice
    assert wrapped(linear) == set()
    assert not SDXLAdapter.matches(linear)


@pytest.mark.parametrize("sites", [["ff"], ["block"], ["attn1", "ff"]], ids="+".join)
def test_forward_chunking_is_refused_for_ff_and_block(unet, sites):
    blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    for block in blocks:
        block.set_chunk_feed_forward(2, 1)
    try:
        with pytest.raises(tr.ConfigError, match=re.escape("set_chunk_feed_forward(None)")):
            tr.apply(unet, config(sites))
        assert wrapped(unet) == set()
        # Attention sites do not care about feed-forward chunking.
        tr.apply(unet, config(["attn1", "attn2"])).remove()
    finally:
        for block in blocks:
            block.set_chunk_feed_forward(None, 0)


def test_params_are_strict():
    with pytest.raises(ValueError):
        SDXLAdapter.Params(sites=("attn1",))  # a tuple is not a list in strict mode
    with pytest.raises(ValueError):
        SDXLAdapter.Params(features="raw")
    with pytest.raises(ValueError):
        SDXLAdapter.Params(max_downsample=0)
    with pytest.raises(ValueError):
        SDXLAdapter.Params(sites=[])
    assert SDXLAdapter.Params().sites == ["stack"]
