"""Parity with the real ``tomesd`` 0.1.3 package on a diffusers SDXL-shaped UNet.

With ``use_rand=False`` (or an odd batch, where tomesd switches randomness off), ``tomesd_grid`` +
``bipartite`` on the SDXL adapter with ``features: block_input`` must reproduce
``tomesd.apply_patch`` to float tolerance. tomesd orders the merged tokens differently (unmerged
sources by score, then destinations); attention without positional encodings and per-token
layers do not see the order, so only float summation order differs.

Known tomesd limitation (any diffusers version): it reads the latent size in a forward
pre-hook from the UNet's first *positional* argument, so ``unet(sample=...)`` raises
``IndexError``; diffusers' pipelines pass the sample positionally, and so do these tests.
"""

from __future__ import annotations

import copy

import pytest
import torch

tomesd = pytest.importorskip("tomesd")

import tokenreduce as tr  # noqa: E402 - after the optional-dependency skip
from tokenreduce.testing.tiny_sdxl import tiny_sdxl_inputs, tiny_sdxl_pipeline, tiny_sdxl_unet  # noqa: E402

ATOL = 1e-5
SITES = ("attn1", "attn2", "ff")


@pytest.fixture(scope="module")
def unet():
    tr.reset_manager()
    return tiny_sdxl_unet(seed=0, sample_size=16)


@pytest.fixture(scope="module")
def reference(unet):
    return copy.deepcopy(unet)  # patched and unpatched by tomesd in turn


@pytest.fixture(scope="module")
def ours(unet):
    return copy.deepcopy(unet)  # applied and removed by tokenreduce in turn


def call(model, inputs: dict) -> torch.Tensor:
    rest = dict(inputs)
    sample, timestep = rest.pop("sample"), rest.pop("timestep")
    with torch.no_grad():
        return model(sample, timestep, **rest).sample


def our_config(ratio, stride, max_downsample, sites, use_rand) -> dict:
    return {
        "adapter": {
            "name": "sdxl",
            "sites": list(sites),
            "max_downsample": max_downsample,
            "features": "block_input",
        },
        "ratio": ratio,
        "selector": {"name": "tomesd_grid", "stride": list(stride), "use_rand": use_rand},
        "merger": {"name": "bipartite"},
        "partitioner": {"name": "global"},
        "reuse": {"name": "always"},
    }


def compare(unet, reference, ours, *, latent, batch, ratio, stride, max_downsample, sites, use_rand=False):
    inputs = tiny_sdxl_inputs(unet, batch=batch, height=latent[0], width=latent[1], seed=1)
    tomesd.apply_patch(
        reference,
        ratio=ratio,
        max_downsample=max_downsample,
        sx=stride[1],
        sy=stride[0],
        use_rand=use_rand,
        merge_attn="attn1" in sites,
        merge_crossattn="attn2" in sites,
        merge_mlp="ff" in sites,
    )
    try:
        expected = call(reference, inputs)
    finally:
        tomesd.remove_patch(reference)
    with tr.apply(ours, our_config(ratio, stride, max_downsample, sites, use_rand)):
        actual = call(ours, inputs)
    baseline = call(unet, inputs)
    error = (actual - expected).abs().max().item()
    effect = (expected - baseline).abs().max().item()
    return error, effect


CASES = [
    # (latent, ratio, stride [sy, sx], max_downsample, sites)
    ((16, 16), 0.5, (2, 2), 2, ("attn1",)),
    ((16, 16), 0.3, (2, 1), 4, ("attn1", "attn2", "ff")),
    ((16, 16), 0.45, (1, 2), 2, ("attn2",)),
    ((18, 22), 0.5, (2, 2), 4, ("attn1", "attn2")),
    ((18, 22), 0.75, (2, 2), 2, ("ff",)),
    ((18, 22), 0.4, (3, 2), 4, ("attn1", "ff")),
    ((20, 12), 0.6, (2, 2), 4, ("attn2", "ff")),
]


@pytest.mark.parametrize(("latent", "ratio", "stride", "max_downsample", "sites"), CASES)
def test_matches_tomesd(unet, reference, ours, latent, ratio, stride, max_downsample, sites) -> None:
    error, effect = compare(
        unet,
        reference,
        ours,
        latent=latent,
        batch=2,
        ratio=ratio,
        stride=stride,
        max_downsample=max_downsample,
        sites=sites,
    )
    assert effect > 100 * ATOL, "merging must visibly change the output for the comparison to mean anything"
    assert error < ATOL, f"max |ours - tomesd| = {error:.3g}"


def test_matches_tomesd_with_use_rand_on_an_odd_batch(unet, reference, ours) -> None:
    # Both force randomness off for odd batches: the top-left destinations again.
    error, effect = compare(
        unet,
        reference,
        ours,
        latent=(16, 16),
        batch=1,
        ratio=0.5,
        stride=(2, 2),
        max_downsample=4,
        sites=SITES,
        use_rand=True,
    )
    assert effect > 100 * ATOL
    assert error < ATOL


def test_random_destinations_change_the_output_but_not_the_global_rng(unet, ours) -> None:
    inputs = tiny_sdxl_inputs(unet, batch=2, seed=1)
    with tr.apply(ours, our_config(0.5, (2, 2), 4, ("attn1",), use_rand=False)):
        top_left = call(ours, inputs)
    state = torch.get_rng_state()
    with tr.apply(ours, our_config(0.5, (2, 2), 4, ("attn1",), use_rand=True)):
        first = call(ours, inputs)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.allclose(first, top_left, atol=ATOL)
    assert torch.isfinite(first).all()


@pytest.mark.slow
def test_pipeline_matches_tomesd() -> None:
    tr.reset_manager()
    pipe = tiny_sdxl_pipeline(seed=0, sample_size=16)

    def generate():
        generator = torch.Generator().manual_seed(0)
        return pipe(
            "a cat", num_inference_steps=2, guidance_scale=5.0, generator=generator, output_type="pt"
        ).images

    baseline = generate()
    tomesd.apply_patch(
        pipe, ratio=0.5, max_downsample=4, use_rand=False, merge_attn=True, merge_crossattn=True
    )
    try:
        expected = generate()
    finally:
        tomesd.remove_patch(pipe)
    with tr.apply(pipe, our_config(0.5, (2, 2), 4, ("attn1", "attn2"), use_rand=False)):
        actual = generate()
    assert (expected - baseline).abs().max() > 100 * ATOL
    assert (actual - expected).abs().max() < ATOL
