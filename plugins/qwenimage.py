"""Qwen-Image adapter: token merging in ``QwenImageTransformer2DModel``'s dual-stream blocks.

Each merged ``QwenImageTransformerBlock`` is a joint-attention image stream
(:mod:`tokenreduce.engine.sites.joint_stream`): ``attn`` gets the merged image tokens, joint
attention runs over ``[text; merged image]``, the image output is unmerged after ``to_out``; the
MLPs, residuals and the text stream stay full length. RoPE comes as ``(image table, text table)``:
merged tokens take their destinations' rows of the image table (built once per plan and call),
the text table is unchanged. The text padding mask (``encoder_hidden_states_mask``) keeps working:
the attention processor extends it by the (merged) image length.

Token grid: from ``img_shapes`` (host values, no device read), which must describe one image of
one frame whose ``h * w`` is the image token count; edit pipelines that append reference-image
tokens are refused with a clear error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from tokenreduce.archs import Architecture, Inputs, random_maker
from tokenreduce.engine.sites import CallInfo, Rope, Stack, StackedTransformerAdapter
from tokenreduce.engine.sites.stack import check_blocks
from tokenreduce.hookspecs import hookimpl
from tokenreduce.params import AdapterParams

if TYPE_CHECKING:
    from diffusers import QwenImageTransformer2DModel

JOINT = "joint"


def grid_from_shapes(img_shapes: Any, num_tokens: int) -> tuple[int, int]:
    """``(h, w)`` of the first sample's ``img_shapes`` entry (``[(1, h, w)]`` or ``(1, h, w)``)."""
    if not img_shapes:
        raise ValueError("Qwen-Image token merging needs `img_shapes` to know the token grid")
    shapes = img_shapes[0]
    shapes = [shapes] if isinstance(shapes, tuple) else list(shapes)
    if len(shapes) != 1 or len(shapes[0]) != 3 or shapes[0][0] != 1:
        raise ValueError(
            f"img_shapes {img_shapes[0]} describe more than one image or frame; Qwen-Image token merging "
            "supports one image (edit pipelines' reference images are not supported)"
        )
    _, h, w = (int(v) for v in shapes[0])
    if h * w != num_tokens:
        raise ValueError(f"img_shapes {h}x{w} do not match {num_tokens} image tokens")
    return h, w


class QwenImageAdapter(StackedTransformerAdapter):
    """Qwen-Image transformer (``QwenImageTransformer2DModel``): dual-stream joint-attention blocks."""

    name = "qwenimage"
    label = "Qwen-Image"
    default_preset = "toma-qwenimage"
    timestep_scale = 1.0  # the pipeline passes t / 1000
    stacks = (Stack(JOINT, "transformer_blocks", "joint", skip="skip", noun="dual-stream"),)
    rope = Rope("split")

    class Params(AdapterParams):
        name: Literal["qwenimage"] = "qwenimage"
        skip: int = Field(5, ge=0, description="The first N transformer blocks are not merged.")
        blocks: list[int] | None = Field(None, description="Explicit block indices to merge; overrides skip.")

        @field_validator("blocks")
        @classmethod
        def _check_blocks(cls, value: list[int] | None) -> list[int] | None:
            return check_blocks(value)

    params: Params

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from diffusers import QwenImageTransformer2DModel

        return isinstance(model, QwenImageTransformer2DModel)

    def reader(self, model: nn.Module) -> Callable[..., CallInfo]:
        def read(
            hidden_states: torch.Tensor,
            encoder_hidden_states: torch.Tensor,
            encoder_hidden_states_mask: Any = None,
            timestep: Any = None,
            img_shapes: Any = None,
            *args: Any,
            **kwargs: Any,
        ) -> CallInfo:
            grid = grid_from_shapes(img_shapes, hidden_states.shape[1])
            return CallInfo(timestep, grid, encoder_hidden_states.shape[1])

        return read


def qwenimage_inputs(
    model: QwenImageTransformer2DModel,
    batch: int,
    height: int,
    width: int,
    text_tokens: int,
    dtype: torch.dtype,
    device: Any,
    generator: torch.Generator,
) -> Inputs:
    """What the Qwen-Image pipeline passes: 2x2-packed latents (16 px per token), text and its mask."""
    cfg = model.config

    randn = random_maker(generator, device, dtype)

    h, w = height // 16, width // 16
    kwargs = {
        "hidden_states": randn(batch, h * w, cfg.in_channels),
        "encoder_hidden_states": randn(batch, text_tokens, cfg.joint_attention_dim),
        "encoder_hidden_states_mask": torch.ones(batch, text_tokens, device=device, dtype=torch.long),
        "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),  # the pipeline passes t / 1000
        "img_shapes": [[(1, h, w)]] * batch,
    }
    return Inputs((), kwargs, h * w)


def restore_rope(model: QwenImageTransformer2DModel) -> None:
    """Rebuild the RoPE frequency tables (plain tensors, not buffers: a meta-device build has no
    values) where diffusers makes them, on the host; they are moved to the call's device on use."""
    rope = model.pos_embed
    with torch.device("cpu"):
        model.pos_embed = type(rope)(theta=rope.theta, axes_dim=rope.axes_dim, scale_rope=rope.scale_rope)


def _model() -> type[QwenImageTransformer2DModel]:
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel


def _tiny_config() -> dict[str, Any]:
    from tokenreduce.testing.tiny_qwenimage import tiny_qwenimage_transformer

    return dict(tiny_qwenimage_transformer().config)


# Qwen/Qwen-Image, transformer/config.json
QWEN_IMAGE: dict[str, Any] = {
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": False,
    "in_channels": 64,
    "joint_attention_dim": 3584,
    "num_attention_heads": 24,
    "num_layers": 60,
    "out_channels": 16,
    "patch_size": 2,
}


@hookimpl
def tokenreduce_register(registry: Any) -> None:
    registry.add(QwenImageAdapter)
    registry.add_preset(
        "toma-qwenimage",
        "tokenreduce.toma_plugin.presets",
        "toma-qwenimage.yaml",
        "ToMA on Qwen-Image: r=0.5 in blocks after the first 5, second half of the steps, 8x8 tiles",
    )
    registry.add_architecture(
        Architecture(
            name="qwen-image",
            adapter="qwenimage",
            model=_model,
            config=QWEN_IMAGE,
            subfolder="transformer",
            batch=1,  # true CFG runs the two branches as separate calls
            dtype="bf16",
            size=1024,
            text_tokens=128,  # prompt length varies (no padding); a long prompt's
            multiple=16,
            inputs=qwenimage_inputs,
            restore_buffers=restore_rope,
            description="Qwen-Image transformer (20 B parameters)",
        )
    )
    # The test kit's toy model, for running the benchmark on a CPU: 128 px -> an 8x8 token grid.
    registry.add_architecture(
        Architecture(
            name="tiny-qwenimage",
            adapter="qwenimage",
            model=_model,
            config=_tiny_config,
            subfolder="transformer",
            batch=1,
            dtype="fp32",
            size=128,
            text_tokens=8,
            multiple=16,
            inputs=qwenimage_inputs,
            restore_buffers=restore_rope,
            description="the test kit's tiny Qwen-Image transformer",
        )
    )
