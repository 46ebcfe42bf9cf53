"""The Wan adapter on a tiny ``WanTransformer3DModel``: 3 frames x 9 x 10 tokens (not a multiple of the 8x8 tiles).

Ratio 0 and ``remove`` exactness, finite merged outputs, batches, compile and the absence of host
reads, for text- and image-to-video, are the adapter contract's (tests/test_adapter_contract.py).
"""

from __future__ import annotations

import pytest
import torch

import tokenreduce as tr
from tokenreduce.config import ConfigError
from tokenreduce.plugins.wan import WanAdapter, latent_grid
from tokenreduce.testing.tiny_wan import tiny_wan_inputs, tiny_wan_transformer

#: Single calls of a bare model: merge at each (the preset's schedule needs a pipeline's step count).
EVERY_CALL = {"schedule": {"name": "always"}}

GRID = (3, 9, 10)  # frames x rows x cols after 1x2x2 patches of a 3 x 18 x 20 latent (8x8 tiles fit)


def call(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


@pytest.fixture(name="t2v", scope="module")
def t2v_fixture():
    return tiny_wan_transformer()


def test_every_part_runs_on_merged_tokens_with_destination_rope(t2v) -> None:
    """Inside attn1 the tokens are merged and the RoPE rows are those of the merged tokens' positions."""
    inputs = tiny_wan_inputs(t2v, batch=2)
    block = t2v.blocks[1]
    seen: dict[str, object] = {}
    processor = block.attn1.processor

    def recording(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        seen["tokens"], seen["rope"] = hidden_states.shape[1], rotary_emb
        return processor(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)

    lengths: dict[str, int] = {}
    hooks = [
        getattr(block, part).register_forward_hook(
            lambda _m, args, _out, part=part: lengths.__setitem__(part, args[0].shape[1])
        )
        for part in ("attn2", "ffn")
    ]
    block.attn1.processor = recording
    try:
        with tr.apply(t2v, "toma-wan", **EVERY_CALL) as handle:
            call(t2v, inputs)
            plan = handle.runtime.groups["blocks"].slots[0].plan
    finally:
        block.attn1.processor = processor
        for hook in hooks:
            hook.remove()
    keep = 270 - 135
    assert seen["tokens"] == keep
    # Hooks see the sub-module's own arguments: the wrapped forward merges them inside.
    assert lengths == {"attn2": 270, "ffn": 270}
    cos, sin = t2v.rope(inputs["hidden_states"])
    got_cos, got_sin = seen["rope"]
    assert torch.equal(got_cos, cos.index_select(1, plan.positions))
    assert torch.equal(got_sin, sin.index_select(1, plan.positions))


def test_sites_groups_and_filters(t2v) -> None:
    handle = tr.apply(
        t2v, "toma-wan", adapter={"name": "wan", "skip": 1, "parts": ["attn1", "ffn"]}, **EVERY_CALL
    )
    try:
        assert [s.path for s in handle.sites] == [
            f"blocks.{i}.{p}" for i in (1, 2, 3) for p in ("attn1", "ffn")
        ]
        assert {s.group for s in handle.sites} == {"blocks"}
        call(t2v, tiny_wan_inputs(t2v))
    finally:
        handle.remove()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"adapter": {"name": "wan", "blocks": [9]}}, "out of range"),
        ({"adapter": {"name": "wan", "skip": 4}}, "selects none"),
        ({"merger": {"name": "downsample"}, "partitioner": {"name": "global"}}, "kv_only|rank"),
    ],
)
def test_bad_input_fails_before_patching(t2v, overrides: dict, message: str) -> None:
    forward = t2v.forward
    with pytest.raises(ConfigError, match=message):
        tr.apply(t2v, "toma-wan", **overrides)
    assert t2v.forward == forward and tr.api.get_handle(t2v) is None


def test_latent_grid_of_published_sizes() -> None:
    assert latent_grid(81, 720, 1280, (1, 2, 2)) == (21, 45, 80)
    assert latent_grid(81, 480, 832, (1, 2, 2)) == (21, 30, 52)


def test_meta_wan_14b_at_720p_has_75600_tokens_per_block() -> None:
    from tokenreduce import archs

    model = archs.build("wan-14b")
    assert next(model.parameters()).device.type == "meta"
    assert (
        len(model.blocks) == 40 and model.config.num_attention_heads * model.config.attention_head_dim == 5120
    )
    grids = WanAdapter().grids_for(model, 720, 1280, frames=81)
    assert grids["blocks"] == (21, 45, 80) and 21 * 45 * 80 == 75600
    _, _, _, runtime, _ = tr.api.prepare(model, "toma-wan")
    layout = runtime.layout(grids["blocks"])
    assert layout.num_tokens == 75600 and layout.keep == 37800
    # 8x8 tiles within each frame: 21 frames x 6 x 10 tiles (45 rows: the last tile row is ragged).
    assert layout.regions.num_regions == 21 * 6 * 10


def test_explain_prints_tokens_per_frame_and_block(capsys) -> None:
    from tokenreduce.cli import main

    code = main(
        ["explain", "toma-wan", "--arch", "wan-1.3b", "--height", "480", "--width", "832", "--frames", "81"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "wan-1.3b" in out and "21x30x52" in out
    text = " ".join(out.split())
    assert "21 frames x 1560 tokens per frame = 32760 tokens per block" in text
    assert "keeps 16380 per block, 780 per frame" in text


def test_bench_builds_and_runs_the_tiny_wan_architecture() -> None:
    from tokenreduce.bench import models

    spec = models.spec("tiny-wan")
    model = models.build_model("tiny-wan", "cpu", torch.float32)
    bench_call = models.make_inputs(
        "tiny-wan", model, spec.batch, spec.size, spec.width, torch.float32, "cpu"
    )
    assert bench_call.tokens == 3 * 9 * 10
    plain = bench_call(model)
    with tr.apply(model, "toma-wan", **EVERY_CALL):
        merged = bench_call(model)
    assert torch.isfinite(plain).all() and torch.isfinite(merged).all() and not torch.equal(merged, plain)
    assert {"wan-1.3b", "wan-14b"} <= set(models.names())


def test_prepare_builds_the_layout_of_a_pixel_size(t2v) -> None:
    with tr.apply(t2v, "toma-wan") as handle:
        handle.prepare(144, 160, frames=9)  # 9 frames -> 3 latent frames; 144x160 px -> 18x20 latent
        assert GRID in handle.runtime._layouts
        # The jitter noise's draw counter too: a compiled first call must not create it.
        assert "cpu" in handle.runtime._draws
