"""A deep copy of a patched model is its own patched model; pickling says to remove first."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import tokenreduce as tr
from tokenreduce.engine.patch import Link
from tokenreduce.testing.tiny_flux import tiny_flux_inputs, tiny_flux_transformer
from tokenreduce.testing.tiny_sdxl import tiny_sdxl_inputs, tiny_sdxl_pipeline, tiny_sdxl_unet

from .test_hooks import FLUX, SDXL_CONFIG


def sdxl():
    unet = tiny_sdxl_unet(seed=0)
    return unet, tiny_sdxl_inputs(unet, batch=2, seed=1), SDXL_CONFIG, {}


def flux():
    model = tiny_flux_transformer(num_layers=2, num_single_layers=2)
    return model, tiny_flux_inputs(model, height_tokens=8, width_tokens=8), "toma-flux", FLUX


@pytest.mark.parametrize("build", [sdxl, flux], ids=["sdxl", "flux"])
@torch.no_grad()
def test_deepcopy_is_an_independent_patched_model(build):
    model, inputs, config, overrides = build()
    reference = model(**inputs).sample
    handle = tr.apply(model, config, **overrides)
    merged = model(**inputs).sample
    twin = copy.deepcopy(model)
    twin_handle = tr.get_handle(twin)
    assert twin_handle is not handle and twin_handle.model is twin
    assert twin_handle.runtime is not handle.runtime
    assert torch.equal(twin(**inputs).sample, merged)
    # The copy's wrappers run the copy's own modules: changing its weights changes only the copy.
    for p in twin.parameters():
        p.zero_()
    zeroed = twin(**inputs).sample
    assert not torch.equal(zeroed, merged)
    assert torch.equal(model(**inputs).sample, merged)
    twin_handle.remove()
    assert not any(isinstance(v, Link) for m in twin.modules() for v in m.__dict__.values())
    assert torch.equal(model(**inputs).sample, merged)  # the original is still patched
    handle.remove()
    assert torch.equal(model(**inputs).sample, reference)


@torch.no_grad()
def test_deepcopy_of_a_pipelines_denoiser_leaves_the_pipeline_alone():
    pipe = tiny_sdxl_pipeline()
    handle = tr.apply(pipe, SDXL_CONFIG)
    twin = copy.deepcopy(pipe.unet)
    twin_handle = tr.get_handle(twin)
    assert twin_handle.pipeline is None and twin_handle.runtime.clock.driver == "timestep"
    twin_handle.remove()
    assert tr.get_handle(pipe) is handle and handle.active
    handle.remove()


@pytest.mark.parametrize("build", [sdxl, flux], ids=["sdxl", "flux"])
def test_pickling_a_patched_model_says_to_remove_first(build):
    model, _, config, overrides = build()
    handle = tr.apply(model, config, **overrides)
    with pytest.raises(pickle.PicklingError, match=r"handle\.remove\(\)"):
        pickle.dumps(model)
    with pytest.raises(pickle.PicklingError, match=r"handle\.remove\(\)"):
        torch.save(model, io.BytesIO())
    torch.save(model.state_dict(), io.BytesIO())  # weights save while applied
    handle.remove()
    torch.save(model, io.BytesIO())
