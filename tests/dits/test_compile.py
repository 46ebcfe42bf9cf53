"""``torch.compile(fullgraph=True)`` of the SD3, Flux.2 and Qwen-Image transformers with ToMA (CPU)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

import tokenreduce as tr
from tokenreduce.testing.tiny_flux2 import tiny_flux2_inputs, tiny_flux2_transformer
from tokenreduce.testing.tiny_qwenimage import tiny_qwenimage_inputs, tiny_qwenimage_transformer
from tokenreduce.testing.tiny_sd3 import tiny_sd3_inputs, tiny_sd3_transformer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:Torchinductor does not support code generation"),
]

CASES = {
    "sd3": (
        lambda: tiny_sd3_transformer(num_layers=2, dual_attention_layers=(0,)),
        tiny_sd3_inputs,
        "toma-sd3",
        {"name": "sd3", "skip": 0},
        1000.0,  # the SD3 pipeline passes timesteps in [0, 1000]
    ),
    "flux2": (
        lambda: tiny_flux2_transformer(num_layers=1, num_single_layers=2),
        tiny_flux2_inputs,
        "toma-flux2",
        {"name": "flux2", "skip_double": 0, "skip_single": 0},
        1.0,
    ),
    "qwenimage": (
        lambda: tiny_qwenimage_transformer(num_layers=2),
        tiny_qwenimage_inputs,
        "toma-qwenimage",
        {"name": "qwenimage", "skip": 0},
        1.0,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_transformer_matches_eager_in_one_graph(name: str) -> None:
    make, make_inputs, preset, adapter, scale = CASES[name]
    model = make()
    inputs = make_inputs(model, batch=2, height_tokens=6, width_tokens=10, text_len=5)
    tr.apply(model, preset, adapter=adapter)
    timesteps = torch.linspace(1.0, 0.1, 4) * scale
    with torch.no_grad():
        # Eager first: a Flux.2 call reads its token grid from img_ids; compiled calls reuse it.
        eager = [model(**{**inputs, "timestep": t.expand(2)}).sample for t in timesteps]
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled = torch.compile(model, fullgraph=True)
        for t, want in zip(timesteps, eager, strict=True):
            torch.testing.assert_close(
                compiled(**{**inputs, "timestep": t.expand(2)}).sample, want, rtol=1e-4, atol=1e-4
            )
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
