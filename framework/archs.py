"""Published denoiser architectures, built from their configs (random or empty weights, no download).

Speed does not depend on the weight values, so ``explain`` and ``bench`` build the real SDXL-base
UNet and Flux.1-dev transformer from these configs instead of fetching checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
SDXL_BASE_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": False,
    "use_linear_projection": True,
}

# black-forest-labs/FLUX.1-dev, transformer/config.json
FLUX_DEV_TRANSFORMER: dict[str, Any] = {
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}

ARCHITECTURES = {"sdxl": SDXL_BASE_UNET, "flux": FLUX_DEV_TRANSFORMER}

#: Architectures that adapter plugins add (name -> builder on the meta device), see ``register``.
BUILDERS: dict[str, Callable[[], torch.nn.Module]] = {}


def register(name: str, builder: Callable[[], torch.nn.Module]) -> None:
    """Add an architecture (an adapter plugin's published config); ``builder`` builds it on the meta device."""
    BUILDERS[name] = builder


def names() -> list[str]:
    """Every architecture ``build`` knows, plugins' included."""
    from tokenreduce.manager import get_registry

    get_registry()  # loads the plugins, which register their architectures
    return [*ARCHITECTURES, *BUILDERS]


def build(
    arch: str,
    *,
    device: str | torch.device = "meta",
    dtype: torch.dtype = torch.float32,
    overrides: dict[str, Any] | None = None,
) -> torch.nn.Module:
    """The denoiser of ``arch`` ("sdxl" or "flux"); on the meta device it holds no memory.

    ``overrides``: config entries to change (e.g. fewer layers of the same shapes, for op counts).
    """
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    known = names()
    if arch in BUILDERS:
        model = BUILDERS[arch]()
        return model if str(device) == "meta" else model.to_empty(device=device).to(dtype=dtype).eval()
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(known)}")
    cls = UNet2DConditionModel if arch == "sdxl" else FluxTransformer2DModel
    context = torch.device("meta") if str(device) == "meta" else nullcontext()
    with context:
        model = cls.from_config({**ARCHITECTURES[arch], **(overrides or {})})
    if str(device) != "meta":
        model = model.to(device=device, dtype=dtype)
    return model.eval()
