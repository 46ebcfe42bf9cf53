"""``torch.compile(fullgraph=True)`` of the tiny UNet with ToMA applied (CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch._dynamo.utils

import tokenreduce as tr
from tokenreduce.testing.tiny_sdxl import tiny_sdxl_inputs, tiny_sdxl_unet

from .conftest import config, relative_error, run
from .test_reuse import at

pytestmark = pytest.mark.slow


def test_inductor_fullgraph_matches_eager():
    """Compiled right after ``apply`` (no eager call first) at the UNet's default, non-square size."""
    # One attention level with 4 blocks: inductor's CPU code generation dominates the test time.
    unet = tiny_sdxl_unet(
        seed=0, sample_size=(16, 24), block_out_channels=(16, 32), transformer_layers_per_block=(1, 1)
    )
    inputs = tiny_sdxl_inputs(unet, batch=2, seed=1)
    reference = run(unet, inputs)
    tr.apply(unet, config())
    torch._dynamo.reset()
    compiled = torch.compile(unet, fullgraph=True)
    got = run(compiled, inputs)
    eager = run(unet, inputs)
    # Inductor fuses and reorders float32 reductions (norms, softmax, matmuls): measured differences
    # are ~2e-6 on outputs of magnitude ~1.5. 1e-4 leaves room for other CPUs and stays two orders
    # of magnitude below the effect of merging itself (checked next), so a graph that skipped or
    # mangled the merge cannot pass.
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4)
    assert relative_error(got, reference) > 1e-2


def test_ten_step_loop_compiles_a_bounded_number_of_graphs():
    """Reuse decisions driven from outside the graph (as a pipeline's scheduler does), compiled
    right after ``apply`` at the default size (no eager call first), two generations of ten steps.

    Dynamo specialises a graph on each sharing group's pending decision, not on the step number:
    SELECT (selection and weights), WEIGHTS (weights from cached destinations) and REUSE (the
    cached plan's tensors become graph inputs). The plan slots exist from ``apply`` on, so the very
    first SELECT runs the same graph as later ones: any number of steps needs three graphs, one
    per decision. Graph count is a
    Dynamo property, independent of the backend: the "eager" backend skips inductor's slow code
    generation, and its outputs must equal an eager twin driven the same way at every step, which
    also shows that each step ran the graph of the right decision. ``handle.reset()`` keeps the
    graphs valid.
    """
    unet = tiny_sdxl_unet(seed=0)
    twin = copy.deepcopy(unet)
    cfg = config(reuse={"name": "step_sharing", "destinations_every": 4, "weights_every": 2})
    handles = [tr.apply(model, cfg) for model in (unet, twin)]
    clocks = [handle.runtime.clock for handle in handles]
    for clock in clocks:
        clock.driver = "manual"
    inputs = tiny_sdxl_inputs(unet, batch=2, seed=2)  # the default size: its layouts are built at apply time
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(unet, fullgraph=True, backend="eager")
    for _generation in range(2):
        for clock in clocks:
            clock.reset()
        for t in torch.linspace(900.0, 100.0, 10):
            got = run(compiled, at(inputs, float(t)))
            want = run(twin, at(inputs, float(t)))
            assert torch.equal(got, want)
            for clock in clocks:
                clock.end_step()
    for handle in handles:
        handle.reset()  # forgets the plans; the compiled graphs stay valid
    assert torch.equal(run(compiled, at(inputs, 900.0)), run(twin, at(inputs, 900.0)))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3


def test_compiled_model_at_a_new_resolution_after_prepare():
    """A size never seen eagerly: ``handle.prepare`` builds its layouts before the compiled call.

    The "eager" backend keeps the test fast; what matters is that Dynamo traces the call with
    ``fullgraph=True`` (no set-up code in the graph) and that it computes what eager does.
    """
    unet = tiny_sdxl_unet(seed=0, block_out_channels=(16, 32), transformer_layers_per_block=(1, 1))
    handle = tr.apply(unet, config())
    latent = (20, 28)  # not the UNet's sample_size
    inputs = tiny_sdxl_inputs(unet, batch=2, height=latent[0], width=latent[1], seed=3)
    handle.prepare(height=latent[0] * 8, width=latent[1] * 8)  # pixels: SDXL's VAE is 8x
    torch._dynamo.reset()
    compiled = torch.compile(unet, fullgraph=True, backend="eager")
    got = run(compiled, inputs)
    torch.testing.assert_close(got, run(unet, inputs), rtol=1e-5, atol=1e-5)


def test_a_merge_schedule_compiles_two_graphs():
    """Merged and unmerged steps: the schedule's decision is a host-side constant per step, so
    steps of ``every k: 3`` (new plans at every merged step) run two graphs, merged and unmerged
    (the very first merged call among them: the plan slots exist from ``apply`` on, see above). A
    second generation compiles nothing new, and each step equals an eager twin driven the same way
    (unmerged steps: the unmodified UNet)."""
    unet = tiny_sdxl_unet(seed=0)
    twin = copy.deepcopy(unet)
    cfg = config(schedule={"name": "every", "k": 3, "offset": 1})
    handles = [tr.apply(model, cfg) for model in (unet, twin)]
    clocks = [handle.runtime.clock for handle in handles]
    for clock in clocks:
        clock.driver = "manual"
        clock.reset(num_steps=10)
    inputs = tiny_sdxl_inputs(unet, batch=2, seed=2)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(unet, fullgraph=True, backend="eager")
    graphs = []
    for _generation in range(2):
        merged = []
        for clock in clocks:
            clock.reset()
        for t in torch.linspace(900.0, 100.0, 10):
            assert torch.equal(run(compiled, at(inputs, float(t))), run(twin, at(inputs, float(t))))
            merged.append(handles[0].runtime.enabled)
            for clock in clocks:
                clock.end_step()
        assert merged == [i in range(1, 10, 3) for i in range(10)]
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs == [2, 2]


def test_apply_builds_the_noise_counter_before_any_call() -> None:
    """A model compiled right after ``apply`` must not create set-up state inside its graph."""
    unet = tiny_sdxl_unet(seed=0)
    with tr.apply(unet, config(selector={"name": "facility_location", "jitter": 0.1})) as handle:
        assert "cpu" in handle.runtime._draws
