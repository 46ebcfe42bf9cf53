"""Where the transformer blocks of a diffusers ``UNet2DConditionModel`` are, and at which resolution.

Static analysis of the module tree only (works on the meta device, runs nothing): the stages in
execution order (down blocks, mid block, up blocks), each stage's downsampling factor relative
to the latent, and every ``BasicTransformerBlock`` inside a continuous-input ``Transformer2DModel``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:  # imported where a model is inspected: plugin discovery loads no model module
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.transformers.transformer_2d import Transformer2DModel


@dataclass(frozen=True)
class UNetBlock:
    """One transformer block of the UNet."""

    path: str  # dotted module path of the BasicTransformerBlock
    block: BasicTransformerBlock
    transformer: Transformer2DModel  # the Transformer2DModel that runs it (its input gives the grid)
    downsample: int  # resolution relative to the latent: 1, 2, 4, 8 ...
    level: int  # 0 = the highest-resolution level that has attention


def _stages(unet: UNet2DConditionModel) -> Iterator[tuple[str, nn.Module, int]]:
    """``(path, stage, downsample)`` in execution order."""
    factor = 1
    for i, stage in enumerate(unet.down_blocks):
        yield f"down_blocks.{i}", stage, factor
        if getattr(stage, "downsamplers", None) is not None:
            factor *= 2
    if getattr(unet, "mid_block", None) is not None:
        yield "mid_block", unet.mid_block, factor
    for i, stage in enumerate(unet.up_blocks):
        yield f"up_blocks.{i}", stage, factor
        if getattr(stage, "upsamplers", None) is not None:
            factor //= 2


def unet_blocks(unet: nn.Module) -> list[UNetBlock]:
    """Every ``BasicTransformerBlock`` of the UNet, in execution order, with its level."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    found: list[tuple[str, BasicTransformerBlock, Transformer2DModel, int]] = []
    for stage_path, stage, factor in _stages(unet):
        for j, transformer in enumerate(getattr(stage, "attentions", None) or ()):
            if not (isinstance(transformer, Transformer2DModel) and transformer.is_input_continuous):
                continue
            for k, block in enumerate(transformer.transformer_blocks):
                if isinstance(block, BasicTransformerBlock):
                    found.append(
                        (f"{stage_path}.attentions.{j}.transformer_blocks.{k}", block, transformer, factor)
                    )
    levels = {factor: i for i, factor in enumerate(sorted({f for *_, f in found}))}
    return [UNetBlock(path, block, t, factor, levels[factor]) for path, block, t, factor in found]


def latent_size(unet: UNet2DConditionModel) -> tuple[int, int]:
    """The UNet's default latent ``(height, width)`` (``config.sample_size``)."""
    size = unet.config.sample_size
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def grid_at(latent: tuple[int, int], downsample: int) -> tuple[int, int]:
    """Token grid after ``downsample``: diffusers' stride-2 convolutions round up at every halving."""
    return (math.ceil(latent[0] / downsample), math.ceil(latent[1] / downsample))


def describe_levels(blocks: list[UNetBlock], latent: tuple[int, int]) -> str:
    """``"0 (downsample 2, 64x64, 24 blocks), 1 (...)"`` for error messages."""
    parts = []
    for level in sorted({b.level for b in blocks}):
        members = [b for b in blocks if b.level == level]
        h, w = grid_at(latent, members[0].downsample)
        parts.append(f"{level} (downsample {members[0].downsample}, {h}x{w} tokens, {len(members)} blocks)")
    return ", ".join(parts) or "none"
