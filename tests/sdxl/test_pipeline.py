"""The SDXL adapter through a real (tiny, offline) ``StableDiffusionXLPipeline``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

import tokenreduce as tr
from tokenreduce.testing.tiny_sdxl import tiny_sdxl_pipeline

from .conftest import config, relative_error, wrapped
from .test_reuse import GROUPS, SHARED, count_calls

STEPS = 4


@pytest.fixture(scope="module")
def pipe():
    return tiny_sdxl_pipeline(seed=0)


@pytest.fixture(autouse=True)
def clean_pipe(pipe):
    yield
    tr.remove(pipe)


def generate(pipe, output_type: str = "latent", **kwargs):
    return pipe(
        "a red cat",
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(0),
        output_type=output_type,
        **kwargs,
    ).images


def test_apply_generate_remove(pipe):
    never_patched = generate(pipe)
    handle = tr.apply(pipe, config())
    assert handle.model is pipe.unet and tr.get_handle(pipe) is handle
    merged = generate(pipe)
    assert torch.isfinite(merged).all()
    assert 1e-4 < relative_error(merged, never_patched) < 0.5
    handle.remove()
    assert wrapped(pipe.unet) == set()
    assert pipe.unet.forward.__func__ is UNet2DConditionModel.forward
    assert "step" not in pipe.scheduler.__dict__ and "set_timesteps" not in pipe.scheduler.__dict__
    assert torch.equal(generate(pipe), never_patched)


def test_ratio_zero_and_disabled_are_the_unmodified_pipeline(pipe):
    never_patched = generate(pipe, output_type="np", height=48, width=80)  # 24x40 latent
    handle = tr.apply(pipe, config(ratio=0.0))
    assert np.array_equal(generate(pipe, output_type="np", height=48, width=80), never_patched)
    tr.apply(pipe, config(ratio=0.5))
    with tr.disabled(pipe):
        assert np.array_equal(generate(pipe, output_type="np", height=48, width=80), never_patched)
    assert not handle.active


def test_apply_to_the_unet_of_a_pipeline(pipe):
    never_patched = generate(pipe)
    handle = tr.apply(pipe.unet, config())
    assert handle.pipeline is None
    assert not torch.equal(generate(pipe), never_patched)
    tr.remove(pipe)  # found through pipe.unet
    assert torch.equal(generate(pipe), never_patched)


def test_plans_reset_at_every_pipeline_call(pipe):
    handle = tr.apply(pipe, config(reuse=SHARED))
    calls = count_calls(handle.runtime)
    first = generate(pipe)
    # Classifier-free guidance runs both halves in one batch-2 call per step: one plan per group.
    assert calls == {"select": GROUPS * len(range(0, STEPS, 2)), "weights": GROUPS * STEPS}
    second = generate(pipe)
    assert calls == {"select": 2 * GROUPS * len(range(0, STEPS, 2)), "weights": 2 * GROUPS * STEPS}
    assert torch.equal(first, second)
