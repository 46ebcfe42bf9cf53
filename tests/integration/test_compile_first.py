"""``torch.compile`` before or after ``apply``: fullgraph at the default size with no extra call,
tokenreduce's own error at a size never prepared, a graph count independent of the number of sites.

The "eager" backend keeps these fast: what is tested is Dynamo's tracing with ``fullgraph=True``
(graph breaks, guards, recompiles), which does not depend on the backend.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch._dynamo.utils

import tokenreduce as tr
from tokenreduce.testing.tiny_flux import tiny_flux_inputs, tiny_flux_pipeline
from tokenreduce.testing.tiny_sdxl import tiny_sdxl_inputs, tiny_sdxl_pipeline, tiny_sdxl_unet

from .test_hooks import FLUX

SDXL = {
    "adapter": {"name": "sdxl"},
    "ratio": 0.5,
    "selector": {"name": "facility_location"},
    "merger": {"name": "attention"},
    "partitioner": {"name": "tile", "size": [4, 4]},
    "reuse": {"name": "step_sharing", "destinations_every": 4, "weights_every": 2},
}
PREPARE = r"handle\.prepare\(height, width\)"


def compiled(module):
    return torch.compile(module, fullgraph=True, backend="eager")


def small_unet():
    return tiny_sdxl_unet(seed=0, block_out_channels=(16, 32), transformer_layers_per_block=(1, 1))


def generate(pipe, **kwargs):
    return pipe(
        "a red cat",
        num_inference_steps=4,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).images


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.slow
@torch.no_grad()
def test_apply_to_a_pipeline_whose_unet_is_already_compiled():
    pipe, twin = tiny_sdxl_pipeline(), tiny_sdxl_pipeline()
    pipe.unet = twin.unet = small_unet()
    twin.unet = small_unet()
    reference = generate(pipe)
    pipe.unet = compiled(pipe.unet)
    handle = tr.apply(pipe, SDXL)
    assert handle.model is pipe.unet._orig_mod and tr.get_handle(pipe) is handle
    tr.apply(twin, SDXL)
    assert torch.equal(generate(pipe), generate(twin))
    handle.remove()
    assert torch.equal(generate(pipe), reference)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the compiled module ran


def test_apply_to_a_compiled_module():
    unet = small_unet()
    handle = tr.apply(compiled(unet), SDXL)
    assert handle.model is unet and tr.get_handle(unet) is handle
    assert tr.remove(compiled(unet)) is True and tr.get_handle(unet) is None


@pytest.mark.slow
@torch.no_grad()
def test_flux_pipeline_compiled_right_after_apply_at_its_default_size():
    pipe, twin = (
        tiny_flux_pipeline(num_layers=1, num_single_layers=1),
        tiny_flux_pipeline(num_layers=1, num_single_layers=1),
    )
    for p in (pipe, twin):
        p.default_sample_size = 16  # this tiny pipeline's default image: 16x16 pixels, 8x8 tokens
        tr.apply(p, "toma-flux", **FLUX)
    pipe.transformer = compiled(pipe.transformer)
    assert torch.equal(generate(pipe, max_sequence_length=8), generate(twin, max_sequence_length=8))


@pytest.mark.slow
@torch.no_grad()
def test_sdxl_new_size_needs_prepare_and_then_compiles():
    unet = small_unet()
    handle = tr.apply(unet, SDXL)
    model = compiled(unet)
    default = tiny_sdxl_inputs(unet)
    assert torch.equal(model(**default).sample, unet(**default).sample)  # the default size: no extra call
    other = tiny_sdxl_inputs(unet, height=24, width=16)
    with pytest.raises(Exception, match=PREPARE):
        model(**other)
    handle.prepare(24 * 8, 16 * 8)
    assert torch.equal(model(**other).sample, unet(**other).sample)


@pytest.mark.slow
@torch.no_grad()
def test_flux_new_size_needs_prepare_and_then_compiles():
    pipe = tiny_flux_pipeline(num_layers=1, num_single_layers=1)
    pipe.default_sample_size = 16
    handle = tr.apply(pipe, "toma-flux", **FLUX)
    model = compiled(pipe.transformer)
    default = tiny_flux_inputs(pipe.transformer, height_tokens=8, width_tokens=8)
    assert torch.equal(model(**default).sample, pipe.transformer(**default).sample)
    other = tiny_flux_inputs(pipe.transformer, height_tokens=10, width_tokens=14)
    with pytest.raises(Exception, match=PREPARE):
        model(**other)
    handle.prepare(10 * 16, 14 * 16)  # pixels at Flux's 16 pixels per token
    assert torch.equal(model(**other).sample, pipe.transformer(**other).sample)


@pytest.mark.slow
@torch.no_grad()
def test_graph_count_does_not_grow_with_the_number_of_sites():
    """Two 6-step generations through the pipeline's clock with twelve sharing groups: as few graphs
    as with one group (at most one per pending decision: select, weights, reuse)."""
    pipe = tiny_sdxl_pipeline()
    pipe.unet = tiny_sdxl_unet(seed=0, block_out_channels=(16, 32), transformer_layers_per_block=(1, 3))
    cfg = {**SDXL, "adapter": {"name": "sdxl", "sites": ["attn1"]}}
    cfg["reuse"] = {**SDXL["reuse"], "sharing": "block"}
    pipe.unet = compiled(pipe.unet)
    handle = tr.apply(pipe, cfg)
    assert len(handle.runtime.groups) == 12
    for _ in range(2):
        pipe("a cat", num_inference_steps=6, output_type="latent", generator=torch.Generator().manual_seed(0))
    assert 1 <= torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3
