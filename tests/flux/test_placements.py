"""Opt-in placements of the Flux and Flux.2 adapters: runs of single-stream blocks merged once
(``single_placement: run``) and the double blocks' image feed-forward on merged tokens (``double_ff``).

Where exactly they merge is checked against the hand-written reference (test_reference.py); here:
exactness at ratio 0, removal, what gets wrapped, errors, ``explain`` and compilation.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

import tokenreduce as tr
from tokenreduce.cli import main
from tokenreduce.engine.sites.run import runs
from tokenreduce.testing.tiny_flux import tiny_flux_inputs, tiny_flux_transformer
from tokenreduce.testing.tiny_flux2 import tiny_flux2_inputs, tiny_flux2_transformer

OPTIONS = [
    {"single_placement": "run"},
    {"double_ff": True},
    {"single_placement": "run", "double_ff": True, "size_weighting": True},
]
EVERY_STEP = {"name": "always"}
MODELS = {
    "flux": (
        tiny_flux_transformer,
        lambda m: tiny_flux_inputs(m, batch=2, height_tokens=10, width_tokens=14),
    ),
    "flux2": (tiny_flux2_transformer, lambda m: tiny_flux2_inputs(m, height_tokens=10, width_tokens=14)),
}


def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


def apply(model, name: str, options: dict, **overrides):
    adapter = {"name": name, "skip_double": 0, "skip_single": 1, **options}
    return tr.apply(model, f"toma-{name}", adapter=adapter, schedule=EVERY_STEP, **overrides)


def test_runs_split_indices_at_gaps() -> None:
    assert runs([1, 2, 3, 5, 7, 8]) == [[1, 2, 3], [5], [7, 8]]
    assert runs([]) == []


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("options", OPTIONS)
def test_ratio_zero_is_bit_exact_and_remove_restores(name, options) -> None:
    make, inputs_of = MODELS[name]
    model, pristine = make(), make()
    inputs = inputs_of(model)
    plain = run(pristine, inputs)
    handle = apply(model, name, options, ratio=0.0)
    assert torch.equal(run(model, inputs), plain)
    handle.remove()
    handle = apply(model, name, options)
    merged = run(model, inputs)
    assert torch.isfinite(merged).all() and not torch.equal(merged, plain)
    handle.remove()
    assert [n for n, m in model.named_modules() if "forward" in m.__dict__] == []
    assert torch.equal(run(model, inputs), plain)


def wrapped(model) -> set[str]:
    return {n for n, m in model.named_modules() if "forward" in m.__dict__}


def test_a_run_wraps_its_ends_and_attentions_only() -> None:
    model = tiny_flux_transformer(num_layers=2, num_single_layers=5)
    handle = apply(model, "flux", {"single_placement": "run", "blocks": [2, 3, 4, 6]})
    singles = {n for n in wrapped(model) if n.startswith("single_transformer_blocks")}
    # runs [0, 1, 2] and [4] of the single blocks: block forwards at the ends, every attention
    assert singles == {
        "single_transformer_blocks.0",
        "single_transformer_blocks.2",
        "single_transformer_blocks.4",
        *(f"single_transformer_blocks.{i}.attn" for i in (0, 1, 2, 4)),
    }
    assert {s.site for s in handle.sites if "single" in s.path} == {"single_run"}
    handle.remove()
    handle = apply(model, "flux", {"single_placement": "run", "blocks": [2, 3]}, reuse={"sharing": "block"})
    # one plan per run when plans are per block: the run's blocks share its first block's group
    assert {s.group for s in handle.sites if "single" in s.path} == {"single_transformer_blocks.0"}


def test_blocks_called_outside_the_transformer_after_a_failed_call_run_unchanged() -> None:
    """A call that fails inside a run leaves its plan behind; blocks called on their own ignore it."""
    model, pristine = tiny_flux_transformer(), tiny_flux_transformer()
    inputs = tiny_flux_inputs(model, batch=2)
    apply(model, "flux", {"single_placement": "run"})

    def fail(*_: object) -> None:
        raise RuntimeError("stop")

    hook = model.single_transformer_blocks[-1].register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="stop"):
        run(model, inputs)
    hook.remove()
    with torch.no_grad():
        image = model.x_embedder(inputs["hidden_states"])
        text = model.context_embedder(inputs["encoder_hidden_states"])
        temb = torch.zeros(2, image.shape[-1])
        rope = model.pos_embed(torch.cat((inputs["txt_ids"], inputs["img_ids"])))
        args = {"hidden_states": image, "encoder_hidden_states": text, "temb": temb, "image_rotary_emb": rope}
        for got, want in zip(
            model.single_transformer_blocks[2](**args),
            pristine.single_transformer_blocks[2](**args),
            strict=True,
        ):
            assert torch.equal(got, want)


def test_double_ff_wraps_the_image_feed_forward_only() -> None:
    model = tiny_flux_transformer(num_layers=2, num_single_layers=2)
    handle = apply(model, "flux", {"double_ff": True})
    assert {"transformer_blocks.0.ff", "transformer_blocks.1.ff"} <= wrapped(model)
    assert not any(n.endswith("ff_context") for n in wrapped(model))
    assert {s.site for s in handle.sites if s.path.startswith("transformer_blocks")} == {"double_ff"}


def test_double_ff_follows_the_schedule() -> None:
    """On a step that does not merge, the feed-forward runs unmerged (no plan left from a merged step)."""
    model, pristine = tiny_flux_transformer(), tiny_flux_transformer()
    inputs = tiny_flux_inputs(model, batch=2)
    adapter = {"name": "flux", "skip_double": 0, "skip_single": 0, "double_ff": True}
    handle = tr.apply(model, "toma-flux", adapter=adapter, schedule=EVERY_STEP)
    assert not torch.equal(run(model, inputs), run(pristine, inputs))
    with handle.disabled():
        assert torch.equal(run(model, inputs), run(pristine, inputs))


def test_bad_placement_and_controlnet_are_refused() -> None:
    model = tiny_flux_transformer()
    with pytest.raises(tr.ConfigError, match="single_placement"):
        apply(model, "flux", {"single_placement": "stack"})
    assert wrapped(model) == set()
    apply(model, "flux", {"single_placement": "run"})
    inputs = tiny_flux_inputs(model)
    residual = torch.zeros_like(model.x_embedder(inputs["hidden_states"]))
    with pytest.raises(ValueError, match="ControlNet"):
        run(model, {**inputs, "controlnet_single_block_samples": [residual]})


def test_explain_shows_the_placements(capsys) -> None:
    for preset, site in (("toma-flux-run", "single_run"), ("toma-flux-ff", "double_ff")):
        assert main(["explain", preset]) == 0
        assert f"placement {site}: " in capsys.readouterr().out


@pytest.mark.slow
def test_compiled_fullgraph_matches_eager() -> None:
    model = tiny_flux_transformer(num_layers=1, num_single_layers=3)
    inputs = tiny_flux_inputs(model, batch=2, height_tokens=10, width_tokens=14, text_len=5)
    apply(model, "flux", {"single_placement": "run", "double_ff": True, "skip_single": 0})
    timesteps = torch.linspace(1.0, 0.1, 4)
    with torch.no_grad():
        eager = [model(**{**inputs, "timestep": t.expand(2)}).sample for t in timesteps]
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)
        for t, want in zip(timesteps, eager, strict=True):
            got = compiled(**{**inputs, "timestep": t.expand(2)}).sample
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
