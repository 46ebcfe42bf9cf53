"""A tiny ``Flux2Transformer2DModel`` (seeded random weights) and its inputs, for tests and demos.

The real architecture (double-stream blocks, fused single-stream blocks, 4-axis RoPE), with small
widths: 3 double and 6 single blocks, so the default filter (skip 2 and 5) merges one of each.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["tiny_flux2_inputs", "tiny_flux2_transformer"]


def tiny_flux2_transformer(seed: int = 0, *, num_layers: int = 3, num_single_layers: int = 6) -> Any:
    from diffusers import Flux2Transformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Flux2Transformer2DModel(
            patch_size=1,
            in_channels=8,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=12,
            timestep_guidance_channels=16,
            axes_dims_rope=(4, 4, 4, 4),
            guidance_embeds=True,
        )
    return model.eval()


def tiny_flux2_inputs(
    model: Any,
    batch: int = 1,
    height_tokens: int = 8,
    width_tokens: int = 8,
    text_len: int = 7,
    seed: int = 0,
) -> dict[str, Any]:
    """Keyword arguments for ``model(**inputs)`` on a ``height_tokens x width_tokens`` token grid."""
    from tokenreduce.plugins.flux2 import flux2_inputs

    gen = torch.Generator().manual_seed(seed)
    return flux2_inputs(
        model, batch, 16 * height_tokens, 16 * width_tokens, text_len, torch.float32, "cpu", gen
    ).kwargs
