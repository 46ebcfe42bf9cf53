"""A tiny ``WanTransformer3DModel`` and its inputs, for tests: the real architecture (patchify,
3-axis RoPE inside attention, self-attention + cross-attention + FFN blocks), small widths.

``image_dim`` set gives the image-to-video variant (extra image-context tokens in cross-attention,
projected by ``add_k_proj``/``add_v_proj``).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["tiny_wan_inputs", "tiny_wan_transformer"]

#: Wan's text encoder length; the image-to-video attention splits the context at ``len - 512``.
TEXT_TOKENS = 512


def tiny_wan_transformer(
    seed: int = 0,
    *,
    num_layers: int = 4,
    num_attention_heads: int = 2,
    attention_head_dim: int = 12,
    in_channels: int = 4,
    text_dim: int = 16,
    ffn_dim: int = 32,
    image_dim: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Any:
    """A ``WanTransformer3DModel`` in eval mode with seeded random weights (1x2x2 patches)."""
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=in_channels,
            text_dim=text_dim,
            freq_dim=16,
            ffn_dim=ffn_dim,
            num_layers=num_layers,
            image_dim=image_dim,
            added_kv_proj_dim=None if image_dim is None else num_attention_heads * attention_head_dim,
            rope_max_seq_len=64,
        )
        # Random everything (some tables start at zero-like values): each block changes its input.
        for param in model.parameters():
            param.data.normal_(0.0, 0.3)
    if dtype != torch.float32:  # nn.Module.to: diffusers warns about its fp32 modules on any cast
        model = torch.nn.Module.to(model, dtype=dtype)
    return model.eval().requires_grad_(False)


def tiny_wan_inputs(
    model: Any,
    *,
    batch: int = 2,
    frames: int = 3,
    height: int = 18,
    width: int = 20,
    text_tokens: int = 7,
    image_tokens: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Keyword inputs of one call: a ``(B, C, frames, height, width)`` latent (grid ``frames x
    height/2 x width/2`` after patchify), text context and, for image-to-video, image context."""
    cfg = model.config
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    inputs: dict[str, Any] = {
        "hidden_states": randn(batch, cfg.in_channels, frames, height, width),
        "timestep": torch.full((batch,), 500.0),
        "encoder_hidden_states": randn(batch, TEXT_TOKENS if cfg.image_dim else text_tokens, cfg.text_dim),
    }
    if cfg.image_dim is not None:
        inputs["encoder_hidden_states_image"] = randn(batch, image_tokens, cfg.image_dim)
    return inputs
