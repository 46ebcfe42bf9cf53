"""SD3 / SD3.5 adapter: token merging in ``SD3Transformer2DModel``'s ``JointTransformerBlock``\\ s.

Each merged block is a joint-attention image stream (:mod:`tokenreduce.engine.sites.joint_stream`):
``attn`` gets the merged image tokens, joint attention runs over ``[merged image; text]`` (SD3's
order), the image output is unmerged after ``to_out``; the MLPs, residuals and the text stream
stay full length. SD3.5-medium's extra image self-attention (``attn2``, in its dual-attention
blocks) runs on the same merged tokens. SD3 has no rotary embedding (positions are added at the
patch embedding), so nothing else changes. One plan per call for all merged blocks when the reuse
policy shares by kind.

Token grid: the latent ``(B, C, H, W)`` the transformer receives, divided by the patch size (no
device read). Text length: ``encoder_hidden_states``. ControlNet residuals and ``skip_layers``
work unchanged; attention masks and gradient checkpointing are refused while merging.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from tokenreduce.archs import Architecture, Inputs, random_maker
from tokenreduce.engine.sites import NO_ROPE, CallInfo, Stack, StackedTransformerAdapter
from tokenreduce.engine.sites.stack import check_blocks
from tokenreduce.hookspecs import hookimpl
from tokenreduce.params import AdapterParams

if TYPE_CHECKING:
    from diffusers import SD3Transformer2DModel

JOINT = "joint"


class SD3Adapter(StackedTransformerAdapter):
    """SD3 / SD3.5 transformer (``SD3Transformer2DModel``): joint-attention blocks."""

    name = "sd3"
    label = "SD3"
    default_preset = "toma-sd3"
    stacks = (Stack(JOINT, "transformer_blocks", "joint", skip="skip", noun="joint", extra_self="attn2"),)
    rope = NO_ROPE
    shared_positions = False  # positions are added before the blocks: nothing positional is merged
    text_first = False  # joint attention runs over [image; text]

    class Params(AdapterParams):
        name: Literal["sd3"] = "sd3"
        skip: int = Field(5, ge=0, description="The first N transformer blocks are not merged.")
        blocks: list[int] | None = Field(None, description="Explicit block indices to merge; overrides skip.")

        @field_validator("blocks")
        @classmethod
        def _check_blocks(cls, value: list[int] | None) -> list[int] | None:
            return check_blocks(value)

    params: Params

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from diffusers import SD3Transformer2DModel

        return isinstance(model, SD3Transformer2DModel)

    def token_grid(self, model: SD3Transformer2DModel, height: int, width: int) -> tuple[int, int]:
        p = model.config.patch_size
        return (height // (8 * p), width // (8 * p))

    def reader(self, model: SD3Transformer2DModel) -> Callable[..., CallInfo]:
        patch = model.config.patch_size

        def read(
            hidden_states: torch.Tensor,
            encoder_hidden_states: torch.Tensor,
            pooled_projections: Any = None,
            timestep: Any = None,
            *args: Any,
            **kwargs: Any,
        ) -> CallInfo:
            h, w = hidden_states.shape[-2:]
            return CallInfo(timestep, (h // patch, w // patch), encoder_hidden_states.shape[1])

        return read


def sd3_inputs(
    model: SD3Transformer2DModel,
    batch: int,
    height: int,
    width: int,
    text_tokens: int,
    dtype: torch.dtype,
    device: Any,
    generator: torch.Generator,
) -> Inputs:
    """What the SD3 pipeline passes: the latent (8x VAE), T5+CLIP text, pooled CLIP, t in [0, 1000]."""
    cfg = model.config

    randn = random_maker(generator, device, dtype)

    h, w = height // 8, width // 8
    kwargs = {
        "hidden_states": randn(batch, cfg.in_channels, h, w),
        "encoder_hidden_states": randn(batch, text_tokens, cfg.joint_attention_dim),
        "pooled_projections": randn(batch, cfg.pooled_projection_dim),
        "timestep": torch.full((batch,), 500.0, device=device, dtype=dtype),
    }
    return Inputs((), kwargs, (h // cfg.patch_size) * (w // cfg.patch_size))


def restore_pos_embed(model: SD3Transformer2DModel) -> None:
    """Recompute the sine-cosine position table (a constant buffer, not a weight) in place on its device."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    embed = model.pos_embed
    table = embed.pos_embed  # (1, grid * grid, dim)
    grid = embed.pos_embed_max_size or int(table.shape[1] ** 0.5)
    values = get_2d_sincos_pos_embed(
        table.shape[-1],
        grid,
        base_size=embed.base_size,
        interpolation_scale=embed.interpolation_scale,
        output_type="pt",
    )
    with torch.no_grad():
        table.copy_(values.float().unsqueeze(0))


def _model() -> type[SD3Transformer2DModel]:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel


def _tiny_config() -> dict[str, Any]:
    from tokenreduce.testing.tiny_sd3 import tiny_sd3_transformer

    return dict(tiny_sd3_transformer().config)


# stabilityai/stable-diffusion-3.5-large, transformer/config.json
SD35_LARGE: dict[str, Any] = {
    "attention_head_dim": 64,
    "caption_projection_dim": 2432,
    "dual_attention_layers": [],
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 38,
    "num_layers": 38,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
    "qk_norm": "rms_norm",
    "sample_size": 128,
}


@hookimpl
def tokenreduce_register(registry: Any) -> None:
    registry.add(SD3Adapter)
    registry.add_preset(
        "toma-sd3",
        "tokenreduce.toma_plugin.presets",
        "toma-sd3.yaml",
        "ToMA on SD3/SD3.5: r=0.5 in joint blocks after the first 5, second half of the steps, 8x8 tiles",
    )
    registry.add_architecture(
        Architecture(
            name="sd3.5-large",
            adapter="sd3",
            model=_model,
            config=SD35_LARGE,
            subfolder="transformer",
            batch=2,  # the pipeline runs both guidance branches in one call
            dtype="bf16",
            size=1024,
            text_tokens=333,  # 77 CLIP + 256 T5 tokens
            multiple=16,
            inputs=sd3_inputs,
            description="SD3.5-large transformer (8.1 B parameters)",
            restore_buffers=restore_pos_embed,
        )
    )
    # The test kit's toy model, for running the benchmark on a CPU: 128 px -> an 8x8 token grid.
    registry.add_architecture(
        Architecture(
            name="tiny-sd3",
            adapter="sd3",
            model=_model,
            config=_tiny_config,
            subfolder="transformer",
            batch=1,
            dtype="fp32",
            size=128,
            text_tokens=8,
            multiple=16,
            inputs=sd3_inputs,
            description="the test kit's tiny SD3 transformer",
            restore_buffers=restore_pos_embed,
        )
    )
