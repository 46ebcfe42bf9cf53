"""Plan reuse across denoising steps: on schedule, per guidance pass, never stale."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import tokenreduce as tr
from tokenreduce.engine import Runtime
from tokenreduce.testing.tiny_sdxl import tiny_sdxl_inputs

from .conftest import config, run

# Destinations every 2 steps, weights every step; blocks of a level share one plan (2 levels).
SHARED = {"name": "step_sharing", "destinations_every": 2, "weights_every": 1}
GROUPS = 2


def count_calls(runtime: Runtime) -> dict[str, int]:
    """Count selections and merge-weight computations by wrapping the runtime's components."""
    calls = {"select": 0, "weights": 0}
    select = runtime.selector.select

    def counted_select(*args: Any, **kwargs: Any):
        calls["select"] += 1
        return select(*args, **kwargs)

    runtime.selector.select = counted_select
    for merger in {id(g.merger): g.merger for g in runtime.groups.values()}.values():
        plan = merger.plan

        def counted_plan(*args: Any, _plan=plan, **kwargs: Any):
            calls["weights"] += 1
            return _plan(*args, **kwargs)

        merger.plan = counted_plan
    return calls


def at(inputs: dict[str, Any], timestep: float) -> dict[str, Any]:
    return {**inputs, "timestep": torch.tensor(timestep)}


def test_plans_follow_the_step_schedule(unet):
    handle = tr.apply(unet, config(reuse=SHARED))
    calls = count_calls(handle.runtime)
    inputs = tiny_sdxl_inputs(unet, batch=2, seed=1)
    selects, weights = [], []
    # Two generations of 5 steps; a larger timestep starts the second one.
    for t in [900, 800, 700, 600, 500, 900, 800, 700]:
        before = dict(calls)
        run(unet, at(inputs, t))
        selects.append(calls["select"] - before["select"])
        weights.append(calls["weights"] - before["weights"])
    assert selects == [GROUPS, 0, GROUPS, 0, GROUPS, GROUPS, 0, GROUPS]
    assert weights == [GROUPS] * 8


def test_never_policy_keeps_the_first_plan(unet):
    handle = tr.apply(unet, config(reuse={"name": "never"}))
    calls = count_calls(handle.runtime)
    inputs = tiny_sdxl_inputs(unet, batch=2, seed=2)
    for t in [900, 800, 700]:
        run(unet, at(inputs, t))
    assert calls == {"select": GROUPS, "weights": GROUPS}


def test_guidance_passes_keep_separate_plans(unet):
    """Cond and uncond passes called one after the other at the same timestep (batch 1 each)."""
    solo = copy.deepcopy(unet)
    tr.apply(unet, config(reuse=SHARED))
    tr.apply(solo, config(reuse=SHARED))
    cond = tiny_sdxl_inputs(unet, batch=1, seed=3)
    uncond = tiny_sdxl_inputs(unet, batch=1, seed=4)
    for t in [900, 800, 700, 600]:
        run(unet, at(cond, t))
        paired = run(unet, at(uncond, t))
        alone = run(solo, at(uncond, t))  # the uncond pass without a cond pass before it
        assert torch.equal(paired, alone)


def test_always_policy_selects_in_every_block(unet):
    handle = tr.apply(unet, config(["block"], reuse={"name": "always"}))  # one group per block
    calls = count_calls(handle.runtime)
    inputs = tiny_sdxl_inputs(unet, batch=2, seed=8)
    for t in [900, 900, 800]:
        run(unet, at(inputs, t))
    blocks = 11  # 3 at level 0, 8 at level 1
    assert calls == {"select": 3 * blocks, "weights": 3 * blocks}


@pytest.mark.parametrize(("batch", "size"), [(2, (18, 26)), (3, (16, 16)), (1, (16, 16))])
def test_changed_batch_or_resolution_never_reuses_a_stale_plan(unet, batch, size):
    fresh = copy.deepcopy(unet)
    handle = tr.apply(unet, config(reuse=SHARED))
    calls = count_calls(handle.runtime)
    run(unet, at(tiny_sdxl_inputs(unet, batch=2, seed=5), 900))  # step 0: select
    changed = at(tiny_sdxl_inputs(unet, batch=batch, height=size[0], width=size[1], seed=6), 800)
    before = calls["select"]
    out = run(unet, changed)  # step 1 would reuse the destinations of step 0
    assert calls["select"] - before == GROUPS
    tr.apply(fresh, config(reuse=SHARED))
    assert torch.equal(out, run(fresh, changed))


def test_reset_forgets_plans(unet):
    handle = tr.apply(unet, config(reuse={"name": "never"}))
    calls = count_calls(handle.runtime)
    inputs = tiny_sdxl_inputs(unet, batch=2, seed=7)
    run(unet, at(inputs, 900))
    run(unet, at(inputs, 800))
    handle.reset()
    run(unet, at(inputs, 700))
    assert calls["select"] == 2 * GROUPS
