"""The SDXL adapter on the tiny UNet: exactness, sites, level filters, grids, batch sizes, apply/remove."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock

import tokenreduce as tr
from tokenreduce.plugins.sdxl import SDXLAdapter
from tokenreduce.testing.tiny_sdxl import tiny_sdxl_inputs, tiny_sdxl_unet

from .conftest import config, relative_error, run, wrapped

LEVEL0 = ["down_blocks.1.attentions.0.transformer_blocks.0", "up_blocks.1.attentions.0.transformer_blocks.0"]
SITE_SETS = [["attn1"], ["attn2"], ["ff"], ["block"], ["attn1", "attn2", "ff"]]
SIZES = [(16, 16), (24, 40), (18, 26)]  # square, non-square, not divisible by 4 (ragged 4x4 tiles too)

# An approximation error bound: outputs unrelated to the reference (independent, equal norm) are
# ~1.41 away in relative L2; merging half of the tokens of these random-weight blocks costs 0.03-0.2.
MAX_RELATIVE_ERROR = 0.5


def blocks_of(unet) -> list[str]:
    return [n for n, m in unet.named_modules() if type(m).__name__ == "BasicTransformerBlock"]


@pytest.mark.parametrize("features", ["normed", "block_input"])
@pytest.mark.parametrize("sites", SITE_SETS, ids="+".join)
def test_ratio_zero_is_the_unmodified_model(unet, sites, features):
    inputs = tiny_sdxl_inputs(unet, batch=2, height=18, width=26, seed=1)
    reference = run(unet, inputs)
    tr.apply(unet, config(sites, ratio=0.0, adapter={"features": features}))
    assert torch.equal(run(unet, inputs), reference)


@pytest.mark.parametrize("features", ["normed", "block_input"])
@pytest.mark.parametrize("sites", SITE_SETS, ids="+".join)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_merging_changes_outputs_within_bound(unet, sites, features, size):
    inputs = tiny_sdxl_inputs(unet, batch=2, height=size[0], width=size[1], seed=2)
    reference = run(unet, inputs)
    handle = tr.apply(unet, config(sites, ratio=0.5, adapter={"features": features}))
    out = run(unet, inputs)
    assert out.shape == reference.shape
    assert torch.isfinite(out).all()
    assert 1e-4 < relative_error(out, reference) < MAX_RELATIVE_ERROR
    with handle.disabled():
        assert torch.equal(run(unet, inputs), reference)


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_batch_sizes(unet, batch):
    inputs = tiny_sdxl_inputs(unet, batch=batch, height=24, width=40, seed=3)
    reference = run(unet, inputs)
    tr.apply(unet, config())
    out = run(unet, inputs)
    assert out.shape == reference.shape and torch.isfinite(out).all()
    assert 1e-4 < relative_error(out, reference) < MAX_RELATIVE_ERROR


@pytest.mark.parametrize(
    ("sites", "features", "expected"),
    [
        (["block"], "normed", {""}),
        (["block"], "block_input", {""}),
        (["attn1"], "normed", {".attn1"}),
        (["attn2", "ff"], "normed", {".attn2", ".ff"}),
        (["attn1", "ff"], "block_input", {"", ".attn1", ".ff"}),  # the block computes the plan from its input
    ],
)
def test_wraps_exactly_the_selected_sites(unet, sites, features, expected):
    tr.apply(unet, config(sites, adapter={"features": features}))
    transformers = {b.rsplit(".transformer_blocks", 1)[0] for b in blocks_of(unet)}
    assert wrapped(unet) == {""} | transformers | {b + s for b in blocks_of(unet) for s in expected}


def test_remove_restores_class_forward_and_outputs(unet):
    inputs = tiny_sdxl_inputs(unet, batch=2, seed=4)
    never_patched = run(tiny_sdxl_unet(seed=0, sample_size=16), inputs)
    assert torch.equal(run(unet, inputs), never_patched)  # same weights: the check below can fail
    handle = tr.apply(unet, config(["attn1", "attn2", "ff"], adapter={"features": "block_input"}))
    assert len(wrapped(unet)) > 1
    assert not torch.equal(run(unet, inputs), never_patched)
    handle.remove()
    assert wrapped(unet) == set()
    assert unet.forward.__func__ is UNet2DConditionModel.forward
    assert "_tokenreduce_handle" not in unet.__dict__
    assert torch.equal(run(unet, inputs), never_patched)
    handle.remove()  # a second removal does nothing
    assert tr.remove(unet) is False
    assert torch.equal(run(unet, inputs), never_patched)


def test_reapply_replaces(unet):
    inputs = tiny_sdxl_inputs(unet, batch=2, seed=5)
    reference = run(unet, inputs)
    first = tr.apply(unet, config(["attn1"]))
    once = run(unet, inputs)
    paths = wrapped(unet)
    second = tr.apply(unet, config(["attn1"]))
    assert not first.active and second.active
    assert wrapped(unet) == paths
    assert torch.equal(run(unet, inputs), once)  # merged once, not twice
    second.remove()
    assert wrapped(unet) == set()  # nothing of the first application is left behind
    assert torch.equal(run(unet, inputs), reference)


def test_disabled_context_and_toggles(unet):
    inputs = tiny_sdxl_inputs(unet, batch=2, seed=6)
    reference = run(unet, inputs)
    handle = tr.apply(unet, config())
    merged = run(unet, inputs)
    with handle.disabled():
        assert torch.equal(run(unet, inputs), reference)
    assert torch.equal(run(unet, inputs), merged)
    with tr.disabled(unet):
        assert torch.equal(run(unet, inputs), reference)
    handle.disable()
    assert torch.equal(run(unet, inputs), reference)
    handle.enable()
    assert torch.equal(run(unet, inputs), merged)


# --------------------------------------------------------------------------- levels and grids


@pytest.mark.parametrize(
    ("adapter", "levels"),
    [
        ({}, {0, 1}),
        ({"levels": [0]}, {0}),
        ({"levels": [1]}, {1}),
        ({"max_downsample": 2}, {0}),
        ({"max_downsample": 4}, {0, 1}),
        ({"levels": [0, 1], "max_downsample": 2}, {0}),
    ],
)
def test_level_filters(unet, adapter, levels):
    handle = tr.apply(unet, config(adapter=adapter))
    # Level 0 runs at the 8x8 grid (downsample 2), level 1 at 4x4 (downsample 4); blocks counted by hand.
    expected_blocks = {0: 3, 1: 8}
    assert {s.group for s in handle.sites} == {f"level{lv}" for lv in levels}
    assert len(handle.sites) == sum(expected_blocks[lv] for lv in levels)
    assert {s.grid for s in handle.sites} == {{0: (8, 8), 1: (4, 4)}[lv] for lv in levels}
    assert all(s.path in blocks_of(unet) for s in handle.sites)


def test_sites_do_not_modify_the_model_and_match_real_grids():
    unet = tiny_sdxl_unet(seed=0, sample_size=(18, 26))
    adapter = SDXLAdapter(SDXLAdapter.Params(sites=["attn1", "ff"]))
    cfg = tr.load_config(config(["attn1", "ff"]))
    specs = adapter.sites(unet, cfg)
    assert wrapped(unet) == set()
    # The grid every block really sees, recorded by hooks on the Transformer2DModels.
    seen: dict[str, tuple[int, int]] = {}

    def record(name: str):
        def hook(module, args):
            seen[name] = tuple(args[0].shape[-2:])

        return hook

    hooks = [
        module.register_forward_pre_hook(record(name))
        for name, module in unet.named_modules()
        if type(module).__name__ == "Transformer2DModel"
    ]
    run(unet, tiny_sdxl_inputs(unet, batch=1))
    for hook in hooks:
        hook.remove()
    assert len(specs) == 2 * len(blocks_of(unet))
    for spec in specs:
        assert spec.grid == seen[spec.path.split(".transformer_blocks")[0]]
    assert {s.site for s in specs} == {"attn1", "ff"}


def test_groups_follow_the_reuse_sharing(unet):
    by_kind = tr.apply(unet, config())
    assert {s.group for s in by_kind.sites} == {"level0", "level1"}
    assert set(by_kind.runtime.groups) == {"level0", "level1"}
    per_block = tr.apply(unet, config(reuse={"name": "step_sharing", "sharing": "block"}))
    assert [s.group for s in per_block.sites] == [s.path for s in per_block.sites]
    assert set(per_block.runtime.groups) == set(blocks_of(unet))


def test_kv_only_merger_at_attn1(unet):
    """ToDo's downsample merger: full-length queries, keys/values from the pooled tokens."""
    inputs = tiny_sdxl_inputs(unet, batch=2, height=18, width=26, seed=7)
    reference = run(unet, inputs)
    cfg = config(
        ["attn1"],
        ratio=0.75,
        merger={"name": "downsample", "factor": 2},
        partitioner={"name": "global"},
        reuse={"name": "always"},
    )
    tr.apply(unet, cfg)
    out = run(unet, inputs)
    assert torch.isfinite(out).all()
    assert 1e-4 < relative_error(out, reference) < MAX_RELATIVE_ERROR
    with tr.disabled(unet):
        assert torch.equal(run(unet, inputs), reference)


@pytest.mark.parametrize("sites", SITE_SETS, ids="+".join)
def test_identity_merger_runs_the_plumbing_exactly(unet, sites):
    inputs = tiny_sdxl_inputs(unet, batch=2, height=18, width=26, seed=8)
    reference = run(unet, inputs)
    tr.apply(unet, config(sites, merger={"name": "identity"}, reuse={"name": "always"}))
    assert torch.equal(run(unet, inputs), reference)


def test_block_site_updates_merged_tokens_and_passes_the_rest_through(unet):
    """With the ``ideal`` merger (keep the first N' tokens), ``x + U(block(M x) - M x)`` means: the
    kept tokens get the block's output on the kept tokens alone, the others leave unchanged."""
    checked = []

    def check(block, args, kwargs, output):
        x = args[0]
        n = x.shape[1]
        keep = n - math.floor(0.5 * n)
        alone = BasicTransformerBlock.forward(block, x[:, :keep], **kwargs)
        torch.testing.assert_close(output[:, :keep], alone, rtol=1e-5, atol=1e-5)
        assert torch.equal(output[:, keep:], x[:, keep:])
        checked.append(n)

    tr.apply(unet, config(["block"], merger={"name": "ideal"}, partitioner={"name": "global"}))
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    hooks = [b.register_forward_hook(check, with_kwargs=True) for b in blocks]
    try:
        run(unet, tiny_sdxl_inputs(unet, batch=2, height=18, width=26, seed=9))
    finally:
        for hook in hooks:
            hook.remove()
    assert sorted(set(checked)) == [5 * 7, 9 * 13]  # both levels of the 18x26 latent
    assert len(checked) == len(blocks)


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize("preset", ["toma-sdxl", "toma"])
def test_presets_on_an_sdxl_shaped_unet(preset):
    unet = tiny_sdxl_unet(seed=0, sample_size=32)  # attention grids 16x16 and 8x8: one 8x8 tile fits both
    inputs = tiny_sdxl_inputs(unet, batch=2, seed=10)
    reference = run(unet, inputs)
    handle = tr.apply(unet, preset, schedule={"name": "always"})  # this one call merges
    assert handle.adapter.name == "sdxl"
    assert {s.grid for s in handle.sites} == {(16, 16), (8, 8)}
    out = run(unet, inputs)
    assert torch.isfinite(out).all()
    assert 1e-4 < relative_error(out, reference) < MAX_RELATIVE_ERROR


def test_toma_sdxl_fits_the_real_sdxl_architecture():
    """The published SDXL-base UNet on the meta device: 70 blocks on 64x64 and 32x32 grids at 1024x1024."""
    from tokenreduce import archs
    from tokenreduce.api import prepare

    model = archs.build("sdxl")
    _, _, adapter, runtime, sites = prepare(model, "toma-sdxl")
    assert len(sites) == 70
    assert {s.grid for s in sites} == {(64, 64), (32, 32)}
    assert {s.group: s.grid for s in sites} == {"level0": (64, 64), "level1": (32, 32)}
    assert adapter.grids_for(model, 768, 1344)["level0"] == (48, 84)
    for grid in ((64, 64), (32, 32), (48, 84), (24, 42)):
        runtime.layout(grid)  # every tile of 8x8 fits; ragged borders are fine
