"""A tiny ``QwenImageTransformer2DModel`` (seeded random weights) and its inputs, for tests and demos.

The real architecture (dual-stream blocks, split image/text RoPE, text padding mask), with small
widths: 7 blocks, so the default filter (skip 5) merges two of them.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["tiny_qwenimage_inputs", "tiny_qwenimage_transformer"]


def tiny_qwenimage_transformer(seed: int = 0, *, num_layers: int = 7) -> Any:
    from diffusers import QwenImageTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=16,
            out_channels=4,
            num_layers=num_layers,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=12,
            axes_dims_rope=(4, 6, 6),
        )
    return model.eval()


def tiny_qwenimage_inputs(
    model: Any,
    batch: int = 1,
    height_tokens: int = 8,
    width_tokens: int = 8,
    text_len: int = 7,
    seed: int = 0,
) -> dict[str, Any]:
    """Keyword arguments for ``model(**inputs)`` on a ``height_tokens x width_tokens`` token grid."""
    from tokenreduce.plugins.qwenimage import qwenimage_inputs

    gen = torch.Generator().manual_seed(seed)
    return qwenimage_inputs(
        model, batch, 16 * height_tokens, 16 * width_tokens, text_len, torch.float32, "cpu", gen
    ).kwargs
