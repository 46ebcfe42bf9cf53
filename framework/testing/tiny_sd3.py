"""A tiny ``SD3Transformer2DModel`` (seeded random weights) and its inputs, for tests and demos.

The real architecture (joint blocks, last one context-pre-only, SD3.5's dual attention in the
blocks of ``dual_attention_layers``, RMS q/k norm), with small widths: 7 blocks, so the default
filter (skip 5) merges two of them.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["tiny_sd3_inputs", "tiny_sd3_transformer"]


def tiny_sd3_transformer(
    seed: int = 0, *, num_layers: int = 7, dual_attention_layers: tuple[int, ...] = (5,)
) -> Any:
    from diffusers import SD3Transformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=4,
            num_layers=num_layers,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=12,
            caption_projection_dim=16,
            pooled_projection_dim=8,
            out_channels=4,
            pos_embed_max_size=32,
            dual_attention_layers=dual_attention_layers,
            qk_norm="rms_norm",
        )
    return model.eval()


def tiny_sd3_inputs(
    model: Any,
    batch: int = 1,
    height_tokens: int = 8,
    width_tokens: int = 8,
    text_len: int = 7,
    seed: int = 0,
) -> dict[str, Any]:
    """Keyword arguments for ``model(**inputs)`` on a ``height_tokens x width_tokens`` token grid."""
    from tokenreduce.plugins.sd3 import sd3_inputs

    gen = torch.Generator().manual_seed(seed)
    return sd3_inputs(
        model, batch, 16 * height_tokens, 16 * width_tokens, text_len, torch.float32, "cpu", gen
    ).kwargs
