"""SD3, Flux.2 and Qwen-Image adapters: placement, RoPE rows, shared plans, bad input.

Ratio 0 and ``remove`` exactness, finite merged outputs, batches, compile and the absence of host
reads are the adapter contract's (tests/test_adapter_contract.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

import tokenreduce as tr
from tokenreduce.config import ConfigError
from tokenreduce.testing.tiny_flux2 import tiny_flux2_inputs, tiny_flux2_transformer
from tokenreduce.testing.tiny_qwenimage import tiny_qwenimage_inputs, tiny_qwenimage_transformer
from tokenreduce.testing.tiny_sd3 import tiny_sd3_inputs, tiny_sd3_transformer

from .conftest import PLANS


@dataclass(frozen=True)
class Case:
    make: Callable[[], Any]
    inputs: Callable[..., dict[str, Any]]
    preset: str
    every_block: dict[str, Any]  # adapter parameters that merge in every block
    groups: tuple[str, ...]  # sharing groups by kind
    blocks: int  # merged blocks with `every_block`
    rope: bool


CASES = {
    "sd3": Case(
        tiny_sd3_transformer, tiny_sd3_inputs, "toma-sd3", {"name": "sd3", "skip": 0}, ("joint",), 7, False
    ),
    "flux2": Case(
        tiny_flux2_transformer,
        tiny_flux2_inputs,
        "toma-flux2",
        {"name": "flux2", "skip_double": 0, "skip_single": 0},
        ("double", "single"),
        9,
        True,
    ),
    "qwenimage": Case(
        tiny_qwenimage_transformer,
        tiny_qwenimage_inputs,
        "toma-qwenimage",
        {"name": "qwenimage", "skip": 0},
        ("joint",),
        7,
        True,
    ),
}
models = pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))


#: Single calls of a bare model: merge at each (the presets' schedules need a pipeline's step count).
EVERY_CALL: dict[str, Any] = {"schedule": {"name": "always"}}


def run(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


def patched(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if "forward" in module.__dict__]


@models
def test_sharing_groups_are_the_block_kinds(case: Case) -> None:
    handle = tr.apply(case.make(), case.preset, adapter=case.every_block)
    assert set(handle.runtime.groups) == set(case.groups)


@models
def test_default_preset_skips_the_first_blocks(case: Case) -> None:
    model = case.make()
    handle = tr.apply(model, case.preset)
    assert 0 < len(handle.sites) < case.blocks
    assert all(
        not site.path.startswith(("transformer_blocks.0.", "single_transformer_blocks.0"))
        for site in handle.sites
    )


@models
@pytest.mark.parametrize("batch", [1, 2])
def test_a_permutation_plan_leaves_the_output_unchanged(case: Case, batch: int) -> None:
    """Every site merges and unmerges the image tokens it should, with their own RoPE rows."""
    model, pristine = case.make(), case.make()
    inputs = case.inputs(model, batch=batch, height_tokens=10, width_tokens=14, text_len=5)
    tr.apply(model, case.preset, adapter=case.every_block, merger={"name": "dit_test_permute"}, **EVERY_CALL)
    torch.testing.assert_close(run(model, inputs), run(pristine, inputs), rtol=1e-4, atol=1e-5)


@models
def test_wrong_rope_rows_change_the_output(case: Case) -> None:
    """The check above can fail: the same permutation without its RoPE rows is another model."""
    model, pristine = case.make(), case.make()
    inputs = case.inputs(model, height_tokens=10, width_tokens=14)
    tr.apply(
        model,
        case.preset,
        adapter=case.every_block,
        merger={"name": "dit_test_wrong_positions"},
        **EVERY_CALL,
    )
    close = torch.allclose(run(model, inputs), run(pristine, inputs), rtol=1e-4, atol=1e-5)
    assert close is not case.rope


@models
@pytest.mark.parametrize("sharing", ["kind", "block"])
def test_one_plan_per_block_kind_and_call(case: Case, sharing: str) -> None:
    model = case.make()
    inputs = case.inputs(model, batch=2, height_tokens=10, width_tokens=14)
    tr.apply(
        model,
        case.preset,
        adapter=case.every_block,
        merger={"name": "dit_test_permute"},
        reuse={"name": "step_sharing", "destinations_every": 1, "weights_every": 1, "sharing": sharing},
        **EVERY_CALL,
    )
    run(model, inputs)
    assert [140] * (len(case.groups) if sharing == "kind" else case.blocks) == PLANS


@models
def test_bad_block_indices_fail_before_patching(case: Case) -> None:
    model = case.make()
    with pytest.raises(ConfigError, match="out of range"):
        tr.apply(model, case.preset, adapter={**case.every_block, "blocks": [0, 99]})
    assert patched(model) == []


def test_sd3_dual_attention_runs_on_the_merged_tokens() -> None:
    model = tiny_sd3_transformer(dual_attention_layers=(5,))
    tr.apply(model, "toma-sd3", adapter={"name": "sd3", "skip": 0})
    assert "transformer_blocks.5.attn2" in patched(model)
    assert "transformer_blocks.4.attn2" not in patched(model)  # no second attention there


def test_flux2_reference_image_caching_is_refused() -> None:
    model = tiny_flux2_transformer()
    inputs = tiny_flux2_inputs(model)
    tr.apply(model, "toma-flux2")
    with pytest.raises(ValueError, match="kv_cache_mode"):
        run(model, {**inputs, "kv_cache_mode": "extract"})


def test_qwenimage_grid_comes_from_img_shapes() -> None:
    model, pristine = tiny_qwenimage_transformer(), tiny_qwenimage_transformer()
    inputs = tiny_qwenimage_inputs(model, height_tokens=10, width_tokens=14)
    tr.apply(
        model,
        "toma-qwenimage",
        adapter={"name": "qwenimage", "skip": 0},
        merger={"name": "dit_test_permute"},
        **EVERY_CALL,
    )
    with pytest.raises(ValueError, match="8x8 do not match 140"):
        run(model, {**inputs, "img_shapes": [[(1, 8, 8)]]})
    with pytest.raises(ValueError, match="one image"):
        run(model, {**inputs, "img_shapes": [[(1, 10, 14), (1, 10, 14)]]})
    torch.testing.assert_close(run(model, inputs), run(pristine, inputs), rtol=1e-4, atol=1e-5)


def test_qwenimage_text_padding_mask_still_applies() -> None:
    model, pristine = tiny_qwenimage_transformer(), tiny_qwenimage_transformer()
    inputs = tiny_qwenimage_inputs(model, batch=2, height_tokens=10, width_tokens=14, text_len=6)
    inputs["encoder_hidden_states_mask"] = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    tr.apply(
        model,
        "toma-qwenimage",
        adapter={"name": "qwenimage", "skip": 0},
        merger={"name": "dit_test_permute"},
        **EVERY_CALL,
    )
    torch.testing.assert_close(run(model, inputs), run(pristine, inputs), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("preset", "arch", "blocks"),
    [
        ("toma-sd3", "sd3.5-large", "33"),
        ("toma-flux2", "flux2-dev", "43"),
        ("toma-qwenimage", "qwen-image", "55"),
    ],
)
def test_explain_builds_the_published_architecture(preset: str, arch: str, blocks: str, capsys) -> None:
    from rich.console import Console

    from tokenreduce.explain import explain

    tr.reset_manager()  # the published architectures come with the first-party plugins
    explain(preset, console=Console(width=200))
    out = capsys.readouterr().out
    assert arch in out and "64x64" in out and f" {blocks} " in out


@models
def test_apply_without_a_config_uses_the_models_preset(case: Case) -> None:
    tr.reset_manager()  # the presets come with the first-party plugins
    handle = tr.apply(case.make())
    assert handle.config.adapter.name == case.every_block["name"] and handle.config.ratio == 0.5
