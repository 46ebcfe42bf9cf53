"""Flux adapter: apply/remove, exactness at ratio 0, block filters, grids, errors before patching."""

from __future__ import annotations

import copy

import pytest
import torch

import tokenreduce as tr
from tokenreduce.config import ConfigError
from tokenreduce.engine import sites
from tokenreduce.engine.sites import grid as grid_module
from tokenreduce.engine.sites import merged_rope
from tokenreduce.plugins.flux import FluxAdapter
from tokenreduce.testing.tiny_flux import (
    image_ids,
    tiny_flux_inputs,
    tiny_flux_pipeline,
    tiny_flux_transformer,
)

ALL_BLOCKS = {"name": "flux", "skip_double": 0, "skip_single": 0}
# The preset merges every third step from step 2; these tests look at merged calls.
EVERY_STEP = {"name": "always"}


def patched_modules(model: torch.nn.Module) -> list[str]:
    """Modules with an instance-level ``forward`` (what the adapter installs)."""
    return [name for name, module in model.named_modules() if "forward" in module.__dict__]


def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


# --------------------------------------------------------------------------- apply / remove


def test_apply_steps_remove_is_bit_identical() -> None:
    model, pristine = tiny_flux_transformer(), tiny_flux_transformer()
    inputs = tiny_flux_inputs(model, batch=2)
    # Merging at every step (the preset merges every third step only).
    handle = tr.apply(model, "toma-flux", adapter=ALL_BLOCKS, schedule={"name": "always"})
    assert patched_modules(model)
    for t in (1.0, 0.75, 0.5):  # a few denoising steps
        inputs["timestep"] = torch.full((2,), t)
        merged = run(model, inputs)
        assert not torch.equal(merged, run(pristine, inputs))
    handle.remove()
    assert patched_modules(model) == []
    assert torch.equal(run(model, inputs), run(pristine, inputs))
    assert tr.get_handle(model) is None


def test_pipeline_apply_steps_remove_is_bit_identical() -> None:
    pipe, pristine = tiny_flux_pipeline(), tiny_flux_pipeline()

    def generate(p, **kw):
        return p(
            "a red cube",
            height=16,
            width=24,  # 8x12 tokens
            num_inference_steps=3,
            max_sequence_length=8,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            **kw,
        ).images

    with torch.no_grad():
        plain = generate(pristine)
        handle = tr.apply(pipe, "toma-flux", schedule=EVERY_STEP, adapter=ALL_BLOCKS)
        assert handle.model is pipe.transformer and handle.pipeline is pipe
        merged = generate(pipe)
        cfg_merged = generate(pipe, negative_prompt="blur", true_cfg_scale=2.0, num_images_per_prompt=2)
        assert (
            merged.shape == plain.shape and torch.isfinite(merged).all() and torch.isfinite(cfg_merged).all()
        )
        assert not torch.equal(merged, plain)
        tr.remove(pipe)
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                assert patched_modules(component) == []
        assert "step" not in pipe.scheduler.__dict__ and "set_timesteps" not in pipe.scheduler.__dict__
        assert torch.equal(generate(pipe), plain)


@pytest.mark.parametrize(("grid", "batch"), [((8, 8), 1), ((10, 14), 3)])
def test_ratio_zero_reproduces_the_model_exactly(grid, batch) -> None:
    model, pristine = tiny_flux_transformer(), tiny_flux_transformer()
    inputs = tiny_flux_inputs(model, batch=batch, height_tokens=grid[0], width_tokens=grid[1])
    tr.apply(model, "toma-flux", schedule=EVERY_STEP, ratio=0.0, adapter=ALL_BLOCKS)
    assert torch.equal(run(model, inputs), run(pristine, inputs))


def test_merging_changes_outputs_but_stays_close() -> None:
    """Bound: the distortion from merging is small next to what a different input changes.

    With random weights the merged output's relative error is about 0.07 at r = 0.5 on all blocks,
    while another noise sample moves the output by about 1.3 (relative): we require the error to
    stay below a fifth of that, and to grow with the ratio.
    """
    model = tiny_flux_transformer()
    inputs = tiny_flux_inputs(model, batch=2, seed=1)
    other = tiny_flux_inputs(model, batch=2, seed=2)
    plain = run(model, inputs)
    input_change = ((run(model, other) - plain).norm() / plain.norm()).item()
    errors = []
    for ratio in (0.25, 0.75):
        handle = tr.apply(model, "toma-flux", schedule=EVERY_STEP, ratio=ratio, adapter=ALL_BLOCKS)
        merged = run(model, inputs)
        handle.remove()
        assert torch.isfinite(merged).all() and not torch.equal(merged, plain)
        errors.append(((merged - plain).norm() / plain.norm()).item())
    assert errors[0] < errors[1] < 0.2 * input_change


def test_reapply_replaces_the_previous_application() -> None:
    model, pristine = tiny_flux_transformer(), tiny_flux_transformer()
    inputs = tiny_flux_inputs(model)
    first = tr.apply(model, "toma-flux", schedule=EVERY_STEP, adapter=ALL_BLOCKS)
    installed = patched_modules(model)
    once = run(model, inputs)
    second = tr.apply(model, "toma-flux", schedule=EVERY_STEP, adapter=ALL_BLOCKS)
    assert not first.active and second.active
    assert patched_modules(model) == installed  # not stacked
    assert torch.equal(run(model, inputs), once)
    third = tr.apply(
        model, "toma-flux", schedule=EVERY_STEP, ratio=0.25, adapter={"name": "flux", "blocks": [0]}
    )
    assert patched_modules(model) == ["", "transformer_blocks.0.attn"]
    third.remove()
    assert torch.equal(run(model, inputs), run(pristine, inputs))


def test_disabled_runs_the_original_and_keeps_the_handle() -> None:
    model, pristine = tiny_flux_transformer(), tiny_flux_transformer()
    inputs = tiny_flux_inputs(model, height_tokens=10, width_tokens=14)
    handle = tr.apply(model, "toma-flux", schedule=EVERY_STEP, adapter=ALL_BLOCKS)
    merged = run(model, inputs)
    with handle.disabled():
        assert torch.equal(run(model, inputs), run(pristine, inputs))
    assert torch.equal(run(model, inputs), merged)


# --------------------------------------------------------------------------- block selection


def test_default_filter_skips_the_first_five_of_each_kind() -> None:
    model = tiny_flux_transformer(num_layers=7, num_single_layers=8)
    handle = tr.apply(model, "toma-flux", schedule=EVERY_STEP)
    assert [s.path for s in handle.sites] == [
        "transformer_blocks.5.attn",
        "transformer_blocks.6.attn",
        "single_transformer_blocks.5",
        "single_transformer_blocks.6",
        "single_transformer_blocks.7",
    ]
    # One wrapper per double block (attn), three per single block (norm, attn, proj_out), one transformer.
    assert sorted(patched_modules(model)) == sorted(
        [""]
        + [f"transformer_blocks.{i}.attn" for i in (5, 6)]
        + [f"single_transformer_blocks.{j}.{m}" for j in (5, 6, 7) for m in ("norm", "attn", "proj_out")]
    )
    assert {s.group for s in handle.sites} == {"double", "single"}


@pytest.mark.parametrize(
    ("params", "double", "single"),
    [
        ({"blocks": [1, 8]}, [1], [2]),  # indices into [6 double..., 7 single...]
        ({"blocks": [1, 8], "double": False}, [], [2]),
        ({"skip_double": 2, "single": False}, [2, 3, 4, 5], []),
        ({"skip_double": 9, "skip_single": 6}, [], [6]),
    ],
)
def test_block_filters(params, double, single) -> None:
    model = tiny_flux_transformer()
    adapter = FluxAdapter(FluxAdapter.Params(**params))
    assert adapter.selected(model) == (double, single)


def test_groups_follow_the_sharing_mode() -> None:
    model = tiny_flux_transformer()
    inputs = tiny_flux_inputs(model)
    handle = tr.apply(
        model, "toma-flux", schedule=EVERY_STEP, adapter={"name": "flux", "skip_double": 3, "skip_single": 4}
    )
    run(model, inputs)
    assert set(handle.runtime.groups) == {"double", "single"}
    block_cfg = {"name": "step_sharing", "destinations_every": 1, "weights_every": 1, "sharing": "block"}
    handle = tr.apply(
        model,
        "toma-flux",
        schedule=EVERY_STEP,
        adapter={"name": "flux", "skip_double": 4, "skip_single": 5},
        reuse=block_cfg,
    )
    run(model, inputs)
    assert set(handle.runtime.groups) == {
        "transformer_blocks.4",
        "transformer_blocks.5",
        "single_transformer_blocks.5",
        "single_transformer_blocks.6",
    }
    assert {s.group for s in handle.sites} == set(handle.runtime.groups)


# --------------------------------------------------------------------------- errors before patching


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"merger": {"name": "no_such_merger"}}, "unknown merger"),
        ({"ratio": -0.1}, "ratio"),
        ({"adapter": {"name": "flux", "grid": [3, 3]}}, "smaller"),  # 4x4 tiles on a 3x3 grid
        (
            {"adapter": {"name": "flux", "skip_double": 6, "skip_single": 7}},
            "6 double-stream and 7 single-stream",
        ),
        ({"adapter": {"name": "flux", "blocks": [13]}}, "out of range"),
        ({"adapter": {"name": "flux", "grid": [8]}}, "grid"),
        ({"merger": {"name": "flux_test_kv_only"}}, "not supported on Flux joint attention"),
        ({"merger": {"name": "downsample"}}, "not supported on Flux joint attention"),  # ToDo
        (
            {"merger": {"name": "flux_test_kv_only"}, "adapter": {"name": "auto"}},
            "not supported on Flux joint attention",
        ),
    ],
)
def test_bad_input_fails_before_patching(overrides, message) -> None:
    model = tiny_flux_transformer()
    with pytest.raises(ConfigError, match=message):
        tr.apply(model, "toma-flux", schedule=EVERY_STEP, **overrides)
    assert patched_modules(model) == []
    assert tr.get_handle(model) is None


def test_adapter_rejects_other_models() -> None:
    assert not FluxAdapter.matches(torch.nn.Linear(2, 2))
    with pytest.raises(tr.UnsupportedModelError):
        tr.apply(torch.nn.Linear(2, 2), "toma-flux")


# --------------------------------------------------------------------------- token grid and text length


def test_grid_is_read_once_per_img_ids(monkeypatch) -> None:
    reads = []
    real = grid_module.grid_from_ids
    monkeypatch.setattr(
        grid_module, "grid_from_ids", lambda ids, n, hint: reads.append(n) or real(ids, n, hint)
    )
    model = tiny_flux_transformer()
    inputs = tiny_flux_inputs(model, height_tokens=10, width_tokens=14, text_len=11)
    tr.apply(model, "toma-flux", schedule=EVERY_STEP, adapter=ALL_BLOCKS)
    for _ in range(3):
        run(model, inputs)
    assert reads == [140]
    inputs["img_ids"] = image_ids(10, 14)  # a new tensor (e.g. the next generation)
    run(model, inputs)
    inputs["img_ids"].add_(0)  # changed in place: the version counter moves
    run(model, inputs)
    assert reads == [140, 140, 140]


def test_inference_mode_works() -> None:
    model, pristine = tiny_flux_transformer(), tiny_flux_transformer()
    tr.apply(model, "toma-flux", schedule=EVERY_STEP, adapter=ALL_BLOCKS, ratio=0.0)
    with torch.inference_mode():
        inputs = tiny_flux_inputs(model, height_tokens=10, width_tokens=14)
        assert torch.equal(model(**inputs).sample, pristine(**inputs).sample)


def test_grid_from_ids_reads_non_square_raster_grids() -> None:
    assert grid_module.grid_from_ids(image_ids(6, 10), 60) == (6, 10)
    assert grid_module.grid_from_ids(image_ids(10, 6) + 3.0, 60) == (10, 6)  # offsets are ignored
    with pytest.raises(ValueError, match="grid"):
        grid_module.grid_from_ids(image_ids(6, 10)[torch.randperm(60)], 60)
    with pytest.raises(ValueError, match="grid"):
        grid_module.grid_from_ids(image_ids(6, 10), 64)


def test_non_raster_ids_need_an_explicit_grid() -> None:
    model, pristine = tiny_flux_transformer(), tiny_flux_transformer()
    inputs = tiny_flux_inputs(model, height_tokens=10, width_tokens=14)
    inputs["img_ids"] = inputs["img_ids"].flip(0)  # not raster order
    tr.apply(model, "toma-flux", schedule=EVERY_STEP, adapter=ALL_BLOCKS)
    with pytest.raises(ValueError, match="grid"):
        run(model, inputs)
    tr.apply(model, "toma-flux", schedule=EVERY_STEP, adapter={**ALL_BLOCKS, "grid": [10, 14]})
    out = run(model, inputs)
    assert torch.isfinite(out).all() and not torch.equal(out, run(pristine, inputs))
    tr.apply(model, "toma-flux", schedule=EVERY_STEP, adapter={**ALL_BLOCKS, "grid": [14, 10]})
    run(model, inputs)  # another factorisation of 140 tokens is the user's call
    tr.apply(model, "toma-flux", schedule=EVERY_STEP, adapter={**ALL_BLOCKS, "grid": [8, 8]})
    with pytest.raises(ValueError, match="8x8"):
        run(model, inputs)


@pytest.mark.parametrize("text_len", [1, 7, 19])
def test_text_length_comes_from_the_inputs(text_len) -> None:
    model, pristine = tiny_flux_transformer(), tiny_flux_transformer()
    inputs = tiny_flux_inputs(model, text_len=text_len)
    tr.apply(model, "toma-flux", schedule=EVERY_STEP, adapter=ALL_BLOCKS)
    out = run(model, inputs)
    assert out.shape == (1, 64, 16) and torch.isfinite(out).all()
    tr.apply(model, "toma-flux", schedule=EVERY_STEP, ratio=0.0, adapter=ALL_BLOCKS)
    assert torch.equal(run(model, inputs), run(pristine, inputs))


# --------------------------------------------------------------------------- details of the wrappers


def test_blocks_called_outside_the_transformer_run_unchanged() -> None:
    model = tiny_flux_transformer(num_layers=1, num_single_layers=1)
    pristine = copy.deepcopy(model)
    tr.apply(model, "toma-flux", schedule=EVERY_STEP, adapter=ALL_BLOCKS)
    gen = torch.Generator().manual_seed(0)
    hidden, text, temb = (
        torch.randn(1, 64, 32, generator=gen),
        torch.randn(1, 5, 32, generator=gen),
        torch.randn(1, 32, generator=gen),
    )
    rope = model.pos_embed(torch.cat((torch.zeros(5, 3), image_ids(8, 8))))
    with torch.no_grad():
        for name in ("transformer_blocks", "single_transformer_blocks"):
            got = getattr(model, name)[0](hidden, text, temb, rope)
            want = getattr(pristine, name)[0](hidden, text, temb, rope)
            assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_ip_adapter_outputs_are_unmerged() -> None:
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    model = tiny_flux_transformer(num_layers=2, num_single_layers=1)
    torch.manual_seed(0)
    for block in model.transformer_blocks:
        block.attn.set_processor(
            FluxIPAdapterAttnProcessor(hidden_size=32, cross_attention_dim=8, num_tokens=(4,))
        )
    pristine = copy.deepcopy(model)
    inputs = tiny_flux_inputs(model, batch=2, height_tokens=10, width_tokens=14)
    inputs["joint_attention_kwargs"] = {"ip_hidden_states": [torch.randn(2, 4, 8)]}
    plain = run(pristine, inputs)
    tr.apply(model, "toma-flux", schedule=EVERY_STEP, adapter=ALL_BLOCKS)
    merged = run(model, inputs)
    assert merged.shape == plain.shape and torch.isfinite(merged).all() and not torch.equal(merged, plain)
    tr.apply(model, "toma-flux", schedule=EVERY_STEP, ratio=0.0, adapter=ALL_BLOCKS)
    assert torch.equal(run(model, inputs), plain)


def test_unsupported_attention_mask_and_checkpointing_are_errors() -> None:
    model = tiny_flux_transformer(num_layers=1, num_single_layers=1)
    inputs = tiny_flux_inputs(model)
    tr.apply(model, "toma-flux", schedule=EVERY_STEP, adapter=ALL_BLOCKS)
    with pytest.raises(ValueError, match="attention_mask"):
        run(
            model,
            {
                **inputs,
                "joint_attention_kwargs": {"attention_mask": torch.ones(1, 1, 71, 71, dtype=torch.bool)},
            },
        )
    model.enable_gradient_checkpointing()
    with pytest.raises(ValueError, match="checkpointing"):
        model(**inputs)


def test_merged_rope_is_built_once_per_plan_and_table() -> None:
    model = tiny_flux_transformer(num_layers=1, num_single_layers=3)
    inputs = tiny_flux_inputs(model, height_tokens=10, width_tokens=14, text_len=5)
    handle = tr.apply(model, "toma-flux", schedule=EVERY_STEP, adapter=ALL_BLOCKS)
    calls = []
    original_cat = torch.cat

    def counting_cat(tensors, *args, **kwargs):
        calls.append(tuple(t.shape for t in tensors))
        return original_cat(tensors, *args, **kwargs)

    rope_shape = (5, 16)  # text rows of one RoPE table: only merged_rope concatenates those
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "cat", counting_cat)
        run(model, inputs)
    # Two groups (double, single) x two tables (cos, sin); the three single blocks share theirs.
    assert sum(1 for shapes in calls if rope_shape in shapes) == 4
    assert set(handle.runtime.groups) == {"double", "single"}


def test_merged_rope_takes_destination_rows() -> None:
    class Plan:
        positions = torch.tensor([5, 0, 2])

    class Group:
        name = "g"

    site = sites.Site(sites.CallContext(), runtime=None, group=Group())
    cos = torch.arange(10.0).unsqueeze(1).expand(10, 4)
    sin = -cos
    plan = Plan()
    merged_cos, merged_sin = merged_rope(site, plan, (cos, sin), text_len=2)
    assert merged_cos[:, 0].tolist() == [0, 1, 7, 2, 4] and torch.equal(merged_sin, -merged_cos)
    assert merged_rope(site, plan, (cos, sin), text_len=2)[0] is merged_cos  # cached
    assert merged_rope(site, Plan(), (cos, sin), text_len=2)[0] is not merged_cos  # new plan
    assert merged_rope(site, plan, (cos.clone(), sin), text_len=2)[0] is not merged_cos  # new table
