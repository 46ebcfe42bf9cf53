"""Size weighting on the site library's adapters: merging identical pairs changes nothing only when
weighted, with the text keys before (Flux.2) or after (SD3) the image keys."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import tokenreduce as tr
from tokenreduce.config import ConfigError
from tokenreduce.engine.attention import KeyWeights, KeyWeightsCache
from tokenreduce.testing.tiny_flux2 import tiny_flux2_inputs, tiny_flux2_transformer
from tokenreduce.testing.tiny_qwenimage import tiny_qwenimage_inputs, tiny_qwenimage_transformer
from tokenreduce.testing.tiny_sd3 import tiny_sd3_inputs, tiny_sd3_transformer

#: Single calls of a bare model: merge at each (the presets' schedules need a pipeline's step count).
ALWAYS = {"name": "always"}

HEIGHT, WIDTH = 4, 8  # tokens; pairs (2i, 2i + 1) are horizontal neighbours


def pairs_config(adapter: dict[str, Any], size_weighting: bool) -> dict[str, Any]:
    return {
        "adapter": {**adapter, "size_weighting": size_weighting},
        "ratio": 0.5,
        "merger": {"name": "test_pairs"},
        "partitioner": {"name": "global"},
    }


def paired_flux2() -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Flux.2 inputs whose image tokens come in identical pairs with identical position ids."""
    model = tiny_flux2_transformer()
    inputs = tiny_flux2_inputs(model, height_tokens=HEIGHT, width_tokens=WIDTH)
    n = HEIGHT * WIDTH
    inputs["hidden_states"] = inputs["hidden_states"][:, : n // 2].repeat_interleave(2, dim=1)
    half = tiny_flux2_inputs(model, height_tokens=HEIGHT, width_tokens=WIDTH // 2)["img_ids"]
    inputs["img_ids"] = half.repeat_interleave(2, dim=0)
    adapter = {"name": "flux2", "grid": [HEIGHT, WIDTH], "skip_double": 0, "skip_single": 0}
    return model, inputs, adapter


def paired_flux2_run_ff() -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """The same with the single-stream blocks merged once as a run and the double blocks' image MLP
    merged: identical pairs stay identical through a merged run, so it is exact when weighted."""
    model, inputs, adapter = paired_flux2()
    return model, inputs, {**adapter, "single_placement": "run", "double_ff": True}


def paired_sd3() -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """SD3 (joint attention over [image; text], SD3.5's image self-attention too) without its
    position embedding, on a latent whose patches come in identical horizontal pairs."""
    model = tiny_sd3_transformer()
    with torch.no_grad():
        model.pos_embed.pos_embed.zero_()
    inputs = tiny_sd3_inputs(model, height_tokens=HEIGHT, width_tokens=WIDTH)
    latent = inputs["hidden_states"]  # (B, C, H, W), 2x2 patches
    b, c, h, w = latent.shape
    patches = latent[..., : w // 2].reshape(b, c, h, w // 4, 1, 2)
    inputs["hidden_states"] = patches.expand(b, c, h, w // 4, 2, 2).reshape(b, c, h, w)
    return model, inputs, {"name": "sd3", "skip": 0}


@pytest.mark.parametrize(
    "make",
    [paired_flux2, paired_flux2_run_ff, paired_sd3],
    ids=["flux2-text-first", "flux2-run-ff", "sd3-text-last"],
)
def test_merging_identical_pairs_changes_nothing_with_size_weighting(make) -> None:
    model, inputs, adapter = make()
    with torch.no_grad():
        reference = model(**inputs).sample
        outs = {}
        for on in (True, False):
            handle = tr.apply(model, pairs_config(adapter, on))
            outs[on] = model(**inputs).sample
            handle.remove()
        after = model(**inputs).sample
    torch.testing.assert_close(outs[True], reference, rtol=1e-5, atol=1e-5)
    assert (outs[False] - reference).abs().max() > 1e-3
    assert torch.equal(after, reference)
    # Every wrapped function is given back (torch's SDPA included).
    assert not hasattr(torch.nn.functional.scaled_dot_product_attention, "_tokenreduce_size_weighted")


def test_qwen_image_weighting_runs_with_the_text_mask_and_is_exact_at_ratio_zero() -> None:
    """Qwen-Image's joint mask (text padding) stays valid with the padded head dim."""
    model = tiny_qwenimage_transformer()
    inputs = tiny_qwenimage_inputs(model, batch=2, height_tokens=10, width_tokens=14, text_len=6)
    inputs["encoder_hidden_states_mask"][1, 4:] = 0  # the second prompt is shorter
    base = {"name": "qwenimage", "skip": 0}
    with torch.no_grad():
        reference = model(**inputs).sample
        outs = {}
        for on in (False, True):
            with tr.apply(model, "toma-qwenimage", adapter={**base, "size_weighting": on}, schedule=ALWAYS):
                outs[on] = model(**inputs).sample
        with tr.apply(
            model, "toma-qwenimage", ratio=0.0, adapter={**base, "size_weighting": True}, schedule=ALWAYS
        ):
            unmerged = model(**inputs).sample
    assert torch.isfinite(outs[True]).all()
    assert (outs[True] - outs[False]).abs().max() > 1e-5
    assert torch.equal(unmerged, reference)


def test_text_keys_take_size_one_on_the_side_the_model_puts_them() -> None:
    class Plan:
        sizes = torch.tensor([[2.0, 3.0]])

    plan = Plan()
    first = KeyWeights.of_plan(plan, text_len=2, text_first=True).log_sizes
    last = KeyWeights.of_plan(plan, text_len=2, text_first=False).log_sizes
    torch.testing.assert_close(first, torch.tensor([[1.0, 1.0, 2.0, 3.0]]).log())
    torch.testing.assert_close(last, torch.tensor([[2.0, 3.0, 1.0, 1.0]]).log())
    cache = KeyWeightsCache()
    joint = cache.get(plan, 2, False)
    assert cache.get(plan, 0) is not joint and cache.get(plan, 2, False) is joint  # both layouts kept


def test_a_processor_size_weighting_cannot_reach_is_refused_before_the_model_is_touched() -> None:
    from diffusers.models.attention_processor import AttnProcessor

    model = tiny_sd3_transformer()
    model.transformer_blocks[5].attn.set_processor(AttnProcessor())
    with pytest.raises(
        ConfigError, match=r"transformer_blocks\.5\.attn: size weighting supports .* AttnProcessor"
    ):
        tr.apply(model, "toma-sd3", adapter={"name": "sd3", "size_weighting": True})
    assert not any("forward" in m.__dict__ for m in model.modules())
