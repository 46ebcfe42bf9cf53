"""tokenreduce's forward wrappers compose with accelerate and diffusers hooks, in both orders."""

from __future__ import annotations

import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
from diffusers.hooks import HookRegistry, PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

import tokenreduce as tr
from tokenreduce.engine.patch import Link
from tokenreduce.testing.tiny_flux import tiny_flux_inputs, tiny_flux_transformer
from tokenreduce.testing.tiny_sdxl import tiny_sdxl_inputs, tiny_sdxl_unet

PAB = "pyramid_attention_broadcast"

SDXL_CONFIG = {
    "adapter": {"name": "sdxl", "sites": ["attn1", "attn2", "ff"]},  # wraps the attention modules
    "ratio": 0.5,
    "selector": {"name": "facility_location"},
    "merger": {"name": "attention"},
    "partitioner": {"name": "tile", "size": [4, 4]},
}
# One merged call at every step: these tests look at single calls, not at the preset's schedule.
FLUX = dict(adapter={"name": "flux", "skip_double": 0, "skip_single": 0}, schedule={"name": "always"})


class Counting(ModelHook):
    """An accelerate hook that counts the calls it sees (what cpu offload's hook does, minus moving)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def pre_forward(self, module, *args, **kwargs):
        self.calls += 1
        return args, kwargs


def sdxl():
    unet = tiny_sdxl_unet(seed=0)
    inputs = tiny_sdxl_inputs(unet, batch=2, seed=1)
    return unet, lambda: unet(**inputs).sample


def flux():
    model = tiny_flux_transformer(num_layers=2, num_single_layers=2)
    inputs = tiny_flux_inputs(model, batch=1, height_tokens=8, width_tokens=8)
    return model, lambda: model(**inputs).sample


MODELS = {"sdxl": (sdxl, SDXL_CONFIG, {}), "flux": (flux, "toma-flux", FLUX)}


def own_forwards(model: torch.nn.Module) -> list[str]:
    """Modules whose instance ``forward`` is an active tokenreduce link."""
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m.__dict__.get("forward"), Link) and m.forward.active
    ]


def no_links_left(model: torch.nn.Module) -> bool:
    """Nothing of tokenreduce runs: every instance forward is gone or a pass-through."""
    return not own_forwards(model) and all(
        not (isinstance(m.__dict__.get("forward"), Link) and m.__dict__["forward"].active)
        for m in model.modules()
    )


def any_link(model: torch.nn.Module) -> bool:
    return any(isinstance(v, Link) for m in model.modules() for v in m.__dict__.values())


@pytest.mark.parametrize("name", MODELS)
@torch.no_grad()
def test_accelerate_hook_installed_after_apply_survives_remove(name):
    build, config, overrides = MODELS[name]
    model, run = build()
    reference = run()
    handle = tr.apply(model, config, **overrides)
    merged = run()
    assert not torch.equal(merged, reference)
    hook = Counting()
    add_hook_to_module(model, hook)  # what enable_model_cpu_offload does to the denoiser
    torch.testing.assert_close(run(), merged, rtol=0, atol=0)
    assert hook.calls == 1
    handle.remove()
    assert torch.equal(run(), reference)
    assert hook.calls == 2  # the accelerate hook is still installed and called
    remove_hook_from_module(model)
    assert torch.equal(run(), reference)  # accelerate put back a pass-through, not tokenreduce
    assert hook.calls == 2
    assert no_links_left(model)


@pytest.mark.parametrize("name", MODELS)
@torch.no_grad()
def test_accelerate_hook_installed_before_apply(name):
    build, config, overrides = MODELS[name]
    model, run = build()
    reference = run()
    hook = Counting()
    add_hook_to_module(model, hook)
    handle = tr.apply(model, config, **overrides)
    merged = run()
    assert not torch.equal(merged, reference) and hook.calls == 1
    remove_hook_from_module(model)  # restores what it saw: the forward tokenreduce sits on
    assert torch.equal(run(), merged)  # tokenreduce still works
    assert hook.calls == 1
    handle.remove()
    assert torch.equal(run(), reference)
    assert not any("forward" in m.__dict__ for m in model.modules())  # fully gone


@pytest.mark.parametrize("name", MODELS)
@torch.no_grad()
def test_accelerate_hook_before_apply_and_tokenreduce_removed_first(name):
    build, config, overrides = MODELS[name]
    model, run = build()
    reference = run()
    hook = Counting()
    add_hook_to_module(model, hook)
    tr.apply(model, config, **overrides)
    tr.remove(model)
    assert torch.equal(run(), reference) and hook.calls == 1
    remove_hook_from_module(model)
    assert not any_link(model)  # accelerate leaves the bound forward it saw; nothing of tokenreduce


def pab(model, timestep: float, skip: int):
    """Pyramid Attention Broadcast on every attention module diffusers finds (``timestep`` inside
    its range skips every ``skip``-th call, outside it every call computes)."""
    config = PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=skip,
        cross_attention_block_skip_range=skip,
        spatial_attention_timestep_skip_range=(100, 800),
        cross_attention_timestep_skip_range=(100, 800),
        current_timestep_callback=lambda: timestep,
    )
    apply_pyramid_attention_broadcast(model, config)
    hooked = [m for m in model.modules() if PAB in getattr(m.__dict__.get("_diffusers_hook"), "hooks", {})]
    assert hooked
    return hooked


def pab_calls(hooked) -> int:
    return sum(m._diffusers_hook.get_hook(PAB).state.iteration for m in hooked)


def remove_pab(model) -> None:
    HookRegistry.check_if_exists_or_initialize(model).remove_hook(PAB, recurse=True)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("pab_first", [False, True])
@torch.no_grad()
def test_pyramid_attention_broadcast_in_both_orders(name, pab_first):
    build, config, overrides = MODELS[name]
    model, run = build()
    reference = run()
    if pab_first:
        hooked = pab(model, timestep=1000.0, skip=2)  # outside its range: computes every call
        handle = tr.apply(model, config, **overrides)
    else:
        handle = tr.apply(model, config, **overrides)
        hooked = pab(model, timestep=1000.0, skip=2)
    merged = run()
    assert not torch.equal(merged, reference)
    assert pab_calls(hooked) == len(hooked)
    # tokenreduce is below the cache hook: the same model as tokenreduce alone (applied to a twin)
    twin, run_twin = build()
    tr.apply(twin, config, **overrides)
    assert torch.equal(merged, run_twin())
    handle.remove()
    assert torch.equal(run(), reference)
    assert pab_calls(hooked) == 2 * len(hooked)  # every PAB hook is still installed and called
    remove_pab(model)
    assert torch.equal(run(), reference)
    assert no_links_left(model)  # disabling the cache did not bring tokenreduce back


@torch.no_grad()
def test_removing_pab_keeps_tokenreduce_working():
    model, run = sdxl()
    pab(model, timestep=1000.0, skip=2)
    handle = tr.apply(model, SDXL_CONFIG)
    merged = run()
    remove_pab(model)
    assert torch.equal(run(), merged)
    handle.remove()
    assert not any("forward" in m.__dict__ for m in model.modules())


@torch.no_grad()
def test_pab_still_skips_over_tokenreduce():
    """Inside its timestep range PAB returns its cached output on every second call, tokenreduce or not."""
    model, run = sdxl()
    tr.apply(model, SDXL_CONFIG)
    hooked = pab(model, timestep=500.0, skip=2)
    calls = []
    attn = hooked[0]
    original = attn._diffusers_hook._fn_refs[0].original_forward  # tokenreduce's link
    assert isinstance(original, Link)
    attn._diffusers_hook._fn_refs[0].original_forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    run()
    run()
    assert len(calls) == 1


@pytest.mark.parametrize("fbc_first", [False, True])
@torch.no_grad()
def test_first_block_cache_on_flux_in_both_orders(fbc_first):
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    def run_in_context(model, run):
        with model.cache_context("cond"):
            return run()

    model, run = flux()
    reference = run()
    if fbc_first:
        apply_first_block_cache(model, FirstBlockCacheConfig(threshold=0.0))  # 0: every block computes
        handle = tr.apply(model, "toma-flux", **FLUX)
    else:
        handle = tr.apply(model, "toma-flux", **FLUX)
        apply_first_block_cache(model, FirstBlockCacheConfig(threshold=0.0))
    hooked = [m for m in model.modules() if getattr(m.__dict__.get("_diffusers_hook"), "hooks", None)]
    assert hooked
    twin, run_twin = flux()
    tr.apply(twin, "toma-flux", **FLUX)
    assert torch.equal(run_in_context(model, run), run_twin())
    handle.remove()
    assert torch.equal(run_in_context(model, run), reference)
    assert all(m._diffusers_hook.hooks for m in hooked)  # the cache hooks are all still there
    with pytest.raises(Exception, match="context"):
        run()  # and still active: FirstBlockCache refuses a call outside a cache context
    HookRegistry.check_if_exists_or_initialize(model).remove_hook("fbc_leader_block_hook", recurse=True)
    HookRegistry.check_if_exists_or_initialize(model).remove_hook("fbc_block_hook", recurse=True)
    assert torch.equal(run(), reference)
    assert no_links_left(model)


@pytest.mark.parametrize("name", MODELS)
@torch.no_grad()
def test_pab_across_merged_and_unmerged_steps(name):
    """A cached attention output from a merged step has fewer tokens than an unmerged step needs
    (and a plan's destinations may have changed since): a step that switches between merging and
    not merging resets the cache hooks, so they compute again instead of broadcasting a stale output."""
    build, config, overrides = MODELS[name]
    model, _ = build()
    inputs = (
        tiny_flux_inputs(model, batch=1, height_tokens=8, width_tokens=8)
        if name == "flux"
        else tiny_sdxl_inputs(model, batch=2, seed=1)
    )
    every_other = {**overrides, "schedule": {"name": "every", "k": 2, "offset": 0}}
    twin, _ = build()  # tokenreduce alone
    tr.apply(model, config, **every_other)
    tr.apply(twin, config, **every_other)
    hooked = pab(model, timestep=500.0, skip=2)  # inside its range: every second call is cached
    for t in (0.9, 0.8, 0.7, 0.6):  # steps 0 and 2 merge, 1 and 3 do not
        step = {
            **inputs,
            "timestep": torch.full_like(inputs["timestep"], t * (1000 if name == "sdxl" else 1)),
        }
        # every step switches between merging and not: the cache computes again each time
        assert torch.equal(model(**step).sample, twin(**step).sample)
    assert pab_calls(hooked) == len(hooked)  # reset at each switch: one call since the last
