"""Size-weighted attention: exact on duplicated tokens, bit-exact when nothing is merged, validated."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import tokenreduce as tr
from tokenreduce.config import ConfigError
from tokenreduce.engine import PatchSet
from tokenreduce.engine.attention import KeyWeights, SizeWeighting, _weighted_backend, padded_dim
from tokenreduce.testing.tiny_flux import tiny_flux_inputs, tiny_flux_transformer
from tokenreduce.testing.tiny_sdxl import tiny_sdxl_inputs, tiny_sdxl_unet

#: Single calls of a bare model: merge at each (the presets' schedules need a pipeline's step count).
ALWAYS = {"name": "always"}


def biased_reference(q, k, v, log_sizes, scale):  # (B, S, H, d) layout
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale + log_sizes[:, None, None, :]
    return torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v)


def native(query, key, value, attn_mask=None, scale=None):
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale).transpose(1, 2)


def native_without_scale(query, key, value):
    return native(query, key, value)


@pytest.mark.parametrize("backend", [native, native_without_scale], ids=["explicit-scale", "default-scale"])
@pytest.mark.parametrize("head_dim", [16, 12])
def test_padded_head_dim_adds_log_size_to_each_key_logit(backend, head_dim) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 9, 3, head_dim, generator=gen, dtype=torch.float64) for _ in range(3))
    sizes = torch.rand(2, 9, generator=gen, dtype=torch.float64) * 5 + 0.5
    weights = KeyWeights(sizes.log())
    takes_scale = backend is native
    wrapped = _weighted_backend(backend, takes_scale)
    from tokenreduce.engine import attention

    attention._IN_FLIGHT.weights = weights
    try:
        kwargs: dict[str, Any] = {"query": q, "key": k, "value": v}
        if takes_scale:
            kwargs.update(attn_mask=None, scale=0.3)
        out = wrapped(**kwargs)
    finally:
        attention._IN_FLIGHT.weights = None
    scale = 0.3 if takes_scale else head_dim**-0.5
    torch.testing.assert_close(out, biased_reference(q, k, v, sizes.log(), scale), rtol=1e-10, atol=1e-10)
    assert padded_dim(head_dim) % 8 == 0 and padded_dim(head_dim) > head_dim
    # Not in flight: the same backend, untouched.
    torch.testing.assert_close(wrapped(query=q, key=k, value=v), native(q, k, v))


def test_projection_route_on_sdxl_attention_equals_duplicated_keys() -> None:
    """AttnProcessor2_0: merged tokens of groups of 1, 2 and 3 identical tokens, weighted by size,
    give each member the output of the full sequence."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=4, dim_head=8).eval()
    assert type(attn.processor) is AttnProcessor2_0
    unique = torch.randn(2, 6, 32)
    counts = torch.tensor([1, 2, 3, 1, 3, 2])
    full = unique.repeat_interleave(counts, dim=1)
    with torch.no_grad():
        expected = attn(full)
        patches = PatchSet()
        sized = SizeWeighting(attn, patches)
        assert sized.route == "projections"
        weights = KeyWeights(counts.float().log().expand(2, 6))
        merged = sized.call(weights, attn.forward, unique)
        plain = sized.call(None, attn.forward, unique)
        patches.undo()
        after = attn(full)
    torch.testing.assert_close(merged.repeat_interleave(counts, dim=1), expected, rtol=1e-5, atol=1e-6)
    assert (plain.repeat_interleave(counts, dim=1) - expected).abs().max() > 1e-3
    assert torch.equal(after, expected)
    assert not any("forward" in m.__dict__ for m in attn.modules())


def paired_flux_inputs(model: Any, height: int, width: int) -> dict[str, torch.Tensor]:
    """Inputs whose image tokens come in identical pairs (2i, 2i + 1) with identical position ids."""
    inputs = tiny_flux_inputs(model, height_tokens=height, width_tokens=width)
    n = height * width
    inputs["hidden_states"] = inputs["hidden_states"][:, : n // 2].repeat_interleave(2, dim=1)
    ids = torch.zeros(n // 2, 3)
    ids[:, 1] = torch.arange(n // 2) // (width // 2)
    ids[:, 2] = torch.arange(n // 2) % (width // 2)
    inputs["img_ids"] = ids.repeat_interleave(2, dim=0)
    return inputs


def pairs_config(adapter: dict[str, Any], size_weighting: bool) -> dict[str, Any]:
    return {
        "adapter": {**adapter, "size_weighting": size_weighting},
        "ratio": 0.5,
        "merger": {"name": "test_pairs"},
        "partitioner": {"name": "global"},
    }


def test_flux_merging_identical_pairs_changes_nothing_with_size_weighting() -> None:
    """Joint attention with text tokens: merged pairs weigh 2 next to each text token only when weighted."""
    model = tiny_flux_transformer()
    inputs = paired_flux_inputs(model, 4, 8)
    adapter = {"name": "flux", "grid": [4, 8], "skip_double": 0, "skip_single": 0}
    from tokenreduce.engine.attention import _RegistryPatch

    users = _RegistryPatch.users
    with torch.no_grad():
        reference = model(**inputs).sample
        outs = {}
        for on in (True, False):
            handle = tr.apply(model, pairs_config(adapter, on))
            assert (_RegistryPatch.users > users) == on  # a size-weighted model holds the registry
            outs[on] = model(**inputs).sample
            handle.remove()
            assert _RegistryPatch.users == users
    torch.testing.assert_close(outs[True], reference, rtol=1e-5, atol=1e-5)
    assert (outs[False] - reference).abs().max() > 1e-3
    # Removing the last size-weighted model gives diffusers' backend registry back unchanged (when
    # no size-weighted model another test patched and dropped without `remove` still holds it).
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    assert _RegistryPatch.users > 0 or not any(
        hasattr(fn, "_tokenreduce_size_weighted") for fn in _AttentionBackendRegistry._backends.values()
    )


@pytest.mark.parametrize("sites", [["stack"], ["block"], ["attn1"], ["attn1", "ff"]])
def test_sdxl_size_weighting_weighs_every_merged_self_attention(sites) -> None:
    """On the UNet, every placement that runs self-attention on merged tokens weighs its keys (the
    exactness of the weighting itself is checked on the attention module above)."""
    unet = tiny_sdxl_unet(seed=0, sample_size=16)
    inputs = tiny_sdxl_inputs(unet, batch=1)
    cfg = {
        "adapter": {"name": "sdxl", "sites": sites},
        "ratio": 0.5,
        "merger": {"name": "hard_mean"},
        "partitioner": {"name": "tile", "size": [4, 4]},
    }
    counted: list[int] = []
    with torch.no_grad():
        outs = {}
        for on in (False, True):
            cfg["adapter"]["size_weighting"] = on
            handle = tr.apply(unet, cfg)
            if on:
                for name, module in unet.named_modules():
                    if name.endswith("attn1") and "forward" in module.to_k.__dict__:
                        counted.append(1)
            outs[on] = unet(**inputs).sample
            handle.remove()
    assert counted, "no self-attention was weighted"
    assert (outs[True] - outs[False]).abs().max() > 1e-4


@pytest.mark.parametrize("merger", ["identity", "attention"])
def test_nothing_merged_is_bit_exact_with_size_weighting(merger) -> None:
    ratio = 0.5 if merger == "identity" else 0.0
    flux = tiny_flux_transformer()
    flux_inputs = tiny_flux_inputs(flux)
    unet = tiny_sdxl_unet(seed=0, sample_size=16)
    unet_inputs = tiny_sdxl_inputs(unet, batch=2)
    for model, inputs, adapter in (
        (flux, flux_inputs, {"name": "flux", "skip_double": 0, "skip_single": 0}),
        (unet, unet_inputs, {"name": "sdxl", "sites": ["stack"]}),
    ):
        cfg = {
            "adapter": {**adapter, "size_weighting": True},
            "ratio": ratio,
            "merger": {"name": merger},
            "partitioner": {"name": "tile", "size": [4, 4]},
        }
        with torch.no_grad():
            reference = model(**inputs).sample
            handle = tr.apply(model, cfg)
            out = model(**inputs).sample
            handle.remove()
        assert torch.equal(out, reference), type(model).__name__


def test_a_merger_without_group_sizes_is_refused_before_the_model_is_touched() -> None:
    unet = tiny_sdxl_unet(seed=0, sample_size=16)
    cfg = {
        "adapter": {"name": "sdxl", "size_weighting": True},
        "ratio": 0.5,
        "merger": {"name": "ideal"},
        "partitioner": {"name": "tile", "size": [4, 4]},
    }
    with pytest.raises(ConfigError, match=r"size_weighting needs group sizes.*merger 'ideal'.*attention"):
        tr.apply(unet, cfg)
    assert not any("forward" in m.__dict__ for m in unet.modules())
    # The same without weighting is fine.
    tr.apply(unet, {**cfg, "adapter": {"name": "sdxl"}}).remove()


def test_auto_adapter_passes_size_weighting_on() -> None:
    model = tiny_flux_transformer()
    handle = tr.apply(model, {"adapter": {"name": "auto", "size_weighting": True}, "ratio": 0.5})
    try:
        assert handle.adapter.params.size_weighting is True
    finally:
        handle.remove()


def test_an_unsupported_processor_is_refused() -> None:
    from diffusers.models.attention_processor import AttnProcessor

    unet = tiny_sdxl_unet(seed=0, sample_size=16)
    unet.set_attn_processor(AttnProcessor())
    with pytest.raises(
        ConfigError, match=r"attn1: size weighting supports .* AttnProcessor2_0; .* AttnProcessor"
    ):
        tr.apply(
            unet,
            {
                "adapter": {"name": "sdxl", "size_weighting": True},
                "merger": {"name": "hard_mean"},
                "partitioner": {"name": "tile", "size": [4, 4]},
            },
        )


def test_soft_merge_sizes_are_assignment_column_sums() -> None:
    """ToMA's sizes sum to the number of tokens (every source spreads a total weight of 1)."""
    from tokenreduce.engine.runtime import Group
    from tokenreduce.testing.contracts import make_runtime
    from tokenreduce.toma_plugin.attention_merger import AttentionMerger
    from tokenreduce.toma_plugin.tile import TilePartitioner

    merger = AttentionMerger(AttentionMerger.Params(temperature=0.1))
    partitioner = TilePartitioner(TilePartitioner.Params(size=[4, 4]))
    runtime = make_runtime(partitioner=partitioner, merger=merger, ratio=0.5)
    x = torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(0))
    plan = runtime.plan(Group("g", merger), x, (8, 8))
    assert plan.sizes.shape == (2, 32)
    torch.testing.assert_close(plan.sizes.sum(dim=1), torch.full((2,), 64.0))
    assert not math.isclose(float(plan.sizes.min()), float(plan.sizes.max()))


@pytest.mark.slow
def test_compiled_fullgraph_matches_eager_with_size_weighting() -> None:
    """Every route traces into one full graph (the in-flight key weights are plain Python state):
    dispatch (Flux), projections (SDXL) and torch's SDPA (SD3's joint attention and q/k-normed
    image self-attention)."""
    import torch._dynamo

    from tokenreduce.testing.tiny_sd3 import tiny_sd3_inputs, tiny_sd3_transformer

    flux = tiny_flux_transformer(num_layers=1, num_single_layers=2)
    flux_inputs = tiny_flux_inputs(flux, batch=2, height_tokens=10, width_tokens=14, text_len=5)
    unet = tiny_sdxl_unet(
        seed=0, sample_size=16, block_out_channels=(16, 32), transformer_layers_per_block=(1, 1)
    )
    unet_inputs = tiny_sdxl_inputs(unet, batch=2, seed=1)
    sd3 = tiny_sd3_transformer(num_layers=3, dual_attention_layers=(1,))
    sd3_inputs = tiny_sd3_inputs(sd3, batch=2, height_tokens=10, width_tokens=14, text_len=5)
    for model, inputs, adapter in (
        (flux, flux_inputs, {"name": "flux", "skip_double": 0, "skip_single": 0}),
        (unet, unet_inputs, {"name": "sdxl"}),
        (sd3, sd3_inputs, {"name": "sd3", "skip": 0}),
    ):
        cfg = {
            "adapter": {**adapter, "size_weighting": True},
            "ratio": 0.5,
            "merger": {"name": "attention"},
            "partitioner": {"name": "tile", "size": [4, 4]},
        }
        handle = tr.apply(model, cfg)
        with torch.no_grad():
            eager = model(**inputs).sample
            torch._dynamo.reset()
            # Dynamo's "eager" backend: a full-graph trace is what is tested; inductor's code
            # generation would only add minutes.
            got = torch.compile(model, fullgraph=True, backend="eager")(**inputs).sample
        handle.remove()
        torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4)


def test_wan_site_library_weighs_self_attention_and_stays_exact_at_ratio_zero() -> None:
    """The cross-attention site kind (Wan) honours size weighting through the same one call."""
    from tokenreduce.testing.tiny_wan import tiny_wan_inputs, tiny_wan_transformer

    model = tiny_wan_transformer()
    inputs = tiny_wan_inputs(model)
    with torch.no_grad():
        reference = model(**inputs).sample
        outs = {}
        for on in (False, True):
            with tr.apply(model, "toma-wan", adapter={"name": "wan", "size_weighting": on}, schedule=ALWAYS):
                outs[on] = model(**inputs).sample
        with tr.apply(
            model, "toma-wan", ratio=0.0, adapter={"name": "wan", "size_weighting": True}, schedule=ALWAYS
        ):
            unmerged = model(**inputs).sample
    assert (outs[True] - outs[False]).abs().max() > 1e-5
    assert torch.equal(unmerged, reference)
