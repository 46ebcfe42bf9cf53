"""The step clock follows the pipeline: a replaced scheduler, another step count, a custom loop."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

import tokenreduce as tr
from tokenreduce.testing.tiny_flux import tiny_flux_pipeline
from tokenreduce.testing.tiny_sdxl import tiny_sdxl_inputs, tiny_sdxl_pipeline

from .test_hooks import FLUX

#: Selections every 5 steps and weights every 2: sharing shows in the counts.
SDXL = {
    "adapter": {"name": "sdxl"},
    "ratio": 0.5,
    "selector": {"name": "facility_location"},
    "merger": {"name": "attention"},
    "partitioner": {"name": "tile", "size": [4, 4]},
    "reuse": {"name": "step_sharing", "destinations_every": 5, "weights_every": 2},
}
FLUX_SHARING = {"reuse": {"name": "step_sharing", "destinations_every": 5, "weights_every": 2}}


def count_calls(runtime) -> dict[str, int]:
    """Selections and merge-weight computations, counted by wrapping the runtime's components."""
    calls = {"select": 0, "weights": 0}
    select = runtime.selector.select

    def counted_select(*args, **kwargs):
        calls["select"] += 1
        return select(*args, **kwargs)

    runtime.selector.select = counted_select
    for merger in {id(g.merger): g.merger for g in runtime.groups.values()}.values():

        def counted_plan(*args, _plan=merger.plan, **kwargs):
            calls["weights"] += 1
            return _plan(*args, **kwargs)

        merger.plan = counted_plan
    return calls


def sdxl_generate(pipe, steps: int = 10):
    return pipe(
        "a red cat",
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images


def flux_generate(pipe, steps: int = 10):
    return pipe(
        "a red cat",
        height=16,
        width=16,
        num_inference_steps=steps,
        max_sequence_length=8,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images


def sdxl_case():
    return (
        tiny_sdxl_pipeline,
        sdxl_generate,
        (SDXL, {}),
        lambda p: DPMSolverMultistepScheduler.from_config(p.scheduler.config),
    )


def flux_case():
    def other(p):
        return FlowMatchEulerDiscreteScheduler.from_config(p.scheduler.config, shift=2.0)

    return tiny_flux_pipeline, flux_generate, ("toma-flux", {**FLUX, **FLUX_SHARING}), other


@pytest.mark.parametrize("case", [sdxl_case, flux_case], ids=["sdxl", "flux"])
@torch.no_grad()
def test_replacing_the_scheduler_after_apply_keeps_step_sharing_exact(case):
    build, generate, (config, overrides), other = case()
    # Swap, then apply: the reference.
    first = build()
    first.scheduler = other(first)
    handle = tr.apply(first, config, **overrides)
    want_calls = count_calls(handle.runtime)
    want = [generate(first), generate(first)]
    # Apply, then swap (the usual diffusers idiom).
    second = build()
    handle = tr.apply(second, config, **overrides)
    second.scheduler = other(second)
    calls = count_calls(handle.runtime)
    got = [generate(second), generate(second)]
    assert calls == want_calls
    assert 0 < calls["select"] < calls["weights"] < 20 * len(handle.runtime.groups)  # sharing is on
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


@torch.no_grad()
def test_a_new_generation_never_reuses_the_last_ones_plans():
    """A 10-step generation, then 7 steps: the second equals a fresh pipeline's 7 steps."""
    pipe, fresh = tiny_sdxl_pipeline(), tiny_sdxl_pipeline()
    handle, fresh_handle = tr.apply(pipe, SDXL), tr.apply(fresh, SDXL)
    sdxl_generate(pipe, 10)
    calls, fresh_calls = count_calls(handle.runtime), count_calls(fresh_handle.runtime)
    assert torch.equal(sdxl_generate(pipe, 7), sdxl_generate(fresh, 7))
    assert calls == fresh_calls


@pytest.mark.parametrize("selector", [{"jitter": 0.5}, {"name": "random"}], ids=["jitter", "random"])
@torch.no_grad()
def test_the_same_seed_gives_the_same_image_at_every_call_with_drawn_destinations(selector):
    """Selectors that draw noise (jitter, random destinations) restart their draws with each
    generation, as the plans do: a second call with the same seed is the first one again, on a
    bare denoiser (its timesteps start the generation) as through the pipeline."""
    config = {**SDXL, "selector": {**SDXL["selector"], **selector}}
    pipe = tiny_sdxl_pipeline()
    with tr.apply(pipe, config):
        first, second = sdxl_generate(pipe, 6), sdxl_generate(pipe, 6)
    assert torch.equal(first, second)
    with tr.apply(pipe.unet, config):
        inputs = tiny_sdxl_inputs(pipe.unet, batch=2, seed=3)
        calls = [[pipe.unet(**{**inputs, "timestep": t}).sample for t in (900, 500, 100)] for _ in range(2)]
    for a, b in zip(*calls, strict=True):
        assert torch.equal(a, b)


@torch.no_grad()
def test_custom_loop_with_the_denoiser_of_a_patched_pipeline():
    """After a pipeline call, a hand-written loop with another scheduler calls ``pipe.unet``: it shares
    plans exactly as the same loop on a bare denoiser does (its timesteps drive the clock)."""
    pipe, bare = tiny_sdxl_pipeline(), tiny_sdxl_pipeline()
    handle = tr.apply(pipe, SDXL)
    bare_handle = tr.apply(bare.unet, SDXL)
    sdxl_generate(pipe, 10)

    def loop(unet):
        scheduler = DDIMScheduler()
        scheduler.set_timesteps(8)
        inputs = tiny_sdxl_inputs(unet, batch=2, seed=3)
        sample = inputs.pop("sample")
        for t in scheduler.timesteps:
            noise = unet(sample, t, **{k: v for k, v in inputs.items() if k != "timestep"}).sample
            sample = scheduler.step(noise, t, sample).prev_sample
        return sample

    calls, bare_calls = count_calls(handle.runtime), count_calls(bare_handle.runtime)
    assert torch.equal(loop(pipe.unet), loop(bare.unet))
    assert calls == bare_calls and calls["select"] < calls["weights"] < 8 * len(handle.runtime.groups)
    # and the pipeline still drives the clock on its next call (sharing on, same as a fresh pipeline)
    fresh = tiny_sdxl_pipeline()
    tr.apply(fresh, SDXL)
    assert torch.equal(sdxl_generate(pipe, 10), sdxl_generate(fresh, 10))
