"""Tiny SDXL-shaped models for tests: a UNet, its forward inputs, and a full offline pipeline.

The UNet has SDXL's layout at toy width: a first level without attention (``DownBlock2D``), then
two cross-attention levels (downsampled 2x and 4x, like SDXL's 64x64 and 32x32 grids at
1024x1024), text-time added conditioning and linear projections. Everything is built from
configs with seeded random weights; nothing is downloaded (the tokenizers are made from a small
vocabulary written to a temporary folder). A few denoising steps take seconds on a CPU.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

CROSS_ATTENTION_DIM = 32  # the two text encoders' hidden sizes (16 + 16), concatenated
TEXT_EMBED_DIM = 16  # projection of the second text encoder (pooled "text_embeds")
TIME_EMBED_DIM = 4  # addition_time_embed_dim; six time ids


def tiny_sdxl_unet(
    seed: int = 0,
    sample_size: int | tuple[int, int] = 16,
    *,
    block_out_channels: tuple[int, ...] = (16, 32, 64),
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 2),
    dtype: torch.dtype = torch.float32,
) -> Any:
    """An SDXL-shaped ``UNet2DConditionModel`` (eval mode) with seeded random weights.

    ``sample_size``: the default latent size, square or ``(height, width)``.

    With the default three levels the UNet has 11 ``BasicTransformerBlock``s: attention levels
    downsampled 2x (3 blocks) and 4x (8 blocks, including the mid block).
    """
    from diffusers import UNet2DConditionModel

    levels = len(block_out_channels)
    if levels < 2 or len(transformer_layers_per_block) != levels:
        raise ValueError("need >= 2 levels and one transformer_layers_per_block entry per level")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size if isinstance(sample_size, int) else tuple(sample_size),
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        block_out_channels=block_out_channels,
        layers_per_block=1,
        transformer_layers_per_block=transformer_layers_per_block,
        attention_head_dim=tuple(max(1, c // 8) for c in block_out_channels),
        cross_attention_dim=CROSS_ATTENTION_DIM,
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=TEXT_EMBED_DIM + 6 * TIME_EMBED_DIM,
    )
    return (unet if dtype == torch.float32 else unet.to(dtype)).eval()


def tiny_sdxl_inputs(
    unet: Any,
    batch: int = 2,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    *,
    timestep: float = 500.0,
    text_tokens: int = 7,
) -> dict[str, Any]:
    """Keyword arguments for ``unet(**inputs)``: latents of ``height x width`` (default: the
    UNet's sample size), a timestep, text states and SDXL's added conditioning."""
    size = unet.config.sample_size
    default_h, default_w = (size, size) if isinstance(size, int) else size
    height, width = height or default_h, width or default_w
    dtype = unet.dtype
    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    text_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    time_ids = torch.tensor([[8.0 * height, 8.0 * width, 0.0, 0.0, 8.0 * height, 8.0 * width]]).repeat(
        batch, 1
    )
    return {
        "sample": torch.randn(batch, unet.config.in_channels, height, width, generator=g).to(dtype),
        "timestep": torch.tensor(timestep),
        "encoder_hidden_states": torch.randn(batch, text_tokens, cross, generator=g).to(dtype),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, text_dim, generator=g).to(dtype),
            "time_ids": time_ids.to(dtype),
        },
    }


def tiny_clip_tokenizer(max_length: int = 16) -> Any:
    """A ``CLIPTokenizer`` over single letters (character-level BPE), made offline."""
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab: dict[str, int] = {}
    for token in [*letters, *(c + "</w>" for c in letters), "<|startoftext|>", "<|endoftext|>", "!"]:
        vocab[token] = len(vocab)
    with tempfile.TemporaryDirectory() as folder:
        vocab_file, merges_file = Path(folder, "vocab.json"), Path(folder, "merges.txt")
        vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n", encoding="utf-8")
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=max_length)


def tiny_sdxl_pipeline(seed: int = 0, sample_size: int = 16) -> Any:
    """A real ``StableDiffusionXLPipeline`` from tiny components (CPU, float32, no download).

    The VAE downsamples 2x, so the default image size is ``2 * sample_size`` pixels.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet = tiny_sdxl_unet(seed, sample_size)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=2 * sample_size,
    ).eval()
    tokenizer = tiny_clip_tokenizer()
    half = CROSS_ATTENTION_DIM // 2
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=half,
        intermediate_size=2 * half,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config)).eval()
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(**text_config, projection_dim=TEXT_EMBED_DIM)
    ).eval()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tiny_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd1_unet(seed: int = 0, sample_size: int = 16, *, sd2: bool = False) -> Any:
    """An SD 1.x-shaped ``UNet2DConditionModel`` (SD 2.x-shaped with ``sd2``), seeded random weights.

    SD 1.x/2.x layout: attention at the full latent resolution too (level 0 is not downsampled),
    no added time/text conditioning; SD 2.x uses linear projections and per-level head dims.
    """
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        attention_head_dim=(2, 4, 4) if sd2 else 8,
        cross_attention_dim=CROSS_ATTENTION_DIM,
        norm_num_groups=8,
        use_linear_projection=sd2,
    )
    return unet.eval()


def tiny_sd1_inputs(unet: Any, batch: int = 2, seed: int = 0, text_tokens: int = 7) -> dict[str, Any]:
    """Keyword arguments for ``unet(**inputs)``: latents, a timestep and text states (no added conditioning)."""
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    return {
        "sample": torch.randn(batch, unet.config.in_channels, size, size, generator=g),
        "timestep": torch.tensor(500.0),
        "encoder_hidden_states": torch.randn(
            batch, text_tokens, unet.config.cross_attention_dim, generator=g
        ),
    }
