"""Flux adapter: token merging inside ``FluxTransformer2DModel``'s double- and single-stream blocks.

Only image tokens are merged; text tokens never are. Placement (the ToMA release's), from the
site library (:mod:`tokenreduce.engine.sites`):

- **Double-stream blocks**: a joint-attention image stream: ``attn`` gets merged image tokens,
  joint attention runs over ``[text; merged image]``, the image output is unmerged after ``to_out``.
- **Single-stream blocks** (split form): attention *and* the parallel MLP run on
  ``[text; merged image]``; ``norm`` merges, ``attn`` takes the merged RoPE table, ``proj_out``
  unmerges; gate and residual stay full length.
- **RoPE**: one ``(cos, sin)`` table over ``[text; image]``; merged tokens take their
  destinations' rows, built once per plan and call and shared by the group's blocks.
- **Plans**: one sharing group per block kind (``double``, ``single``) when the reuse policy
  shares by kind.

Token grid: ``grid`` from the parameters, else read from ``img_ids`` (axis 1 = row, axis 2 =
column, raster order) once per distinct tensor; compiled calls use the grid last read or prepared
for the same token count (see :mod:`tokenreduce.engine.sites.grid`). Run one eager call (or
``handle.prepare``) at each new resolution before compiled ones. The text length is read from
``encoder_hidden_states`` at every call. Attention masks and gradient checkpointing are not
supported while merging (a clear error is raised).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from tokenreduce.engine.sites import JOINT_TEXT_FIRST, CallInfo, Stack, StackedTransformerAdapter
from tokenreduce.hookspecs import hookimpl
from tokenreduce.params import StrictParams

DOUBLE, SINGLE = "double", "single"


def check_blocks(value: list[int] | None) -> list[int] | None:
    if value is not None and any(i < 0 for i in value):
        raise ValueError(f"block indices must be >= 0, got {value}")
    return value


def check_grid(value: list[int] | None) -> list[int] | None:
    if value is not None and (len(value) != 2 or min(value) < 1):
        raise ValueError(f"grid must be [H, W] with positive sides, got {value}")
    return value


class FluxAdapter(StackedTransformerAdapter):
    """Flux transformer (``FluxTransformer2DModel``): double- and single-stream blocks."""

    name = "flux"
    label = "Flux"
    default_preset = "toma-flux"
    stacks = (
        Stack(
            DOUBLE, "transformer_blocks", "joint", skip="skip_double", enable="double", noun="double-stream"
        ),
        Stack(
            SINGLE,
            "single_transformer_blocks",
            "single_split",
            skip="skip_single",
            enable="single",
            noun="single-stream",
        ),
    )
    rope = JOINT_TEXT_FIRST

    class Params(StrictParams):
        name: Literal["flux"] = "flux"
        skip_double: int = Field(5, ge=0, description="The first N double-stream blocks are not merged.")
        skip_single: int = Field(5, ge=0, description="The first N single-stream blocks are not merged.")
        double: bool = Field(True, description="Merge in double-stream blocks at all.")
        single: bool = Field(True, description="Merge in single-stream blocks at all.")
        blocks: list[int] | None = Field(
            None,
            description=(
                "Explicit blocks to merge, as indices into [double blocks..., single blocks...]; overrides "
                "skip_double/skip_single (double/single still apply)."
            ),
        )
        grid: list[int] | None = Field(
            None,
            description=(
                "[H, W] image-token grid, for img_ids that are not a raster grid or cannot be read (compiled "
                "calls at a non-square size never run eagerly). Default: read from img_ids."
            ),
        )

        @field_validator("blocks")
        @classmethod
        def _check_blocks(cls, value: list[int] | None) -> list[int] | None:
            return check_blocks(value)

        @field_validator("grid")
        @classmethod
        def _check_grid(cls, value: list[int] | None) -> list[int] | None:
            return check_grid(value)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from diffusers import FluxTransformer2DModel  # lazy: keeps plugin discovery light

        return isinstance(model, FluxTransformer2DModel)

    def reader(self, model: nn.Module) -> Callable[..., CallInfo]:
        grids = self.id_grids()

        def read(
            hidden_states: torch.Tensor,
            encoder_hidden_states: torch.Tensor,
            pooled_projections: Any = None,
            timestep: Any = None,
            img_ids: torch.Tensor | None = None,
            *args: Any,
            **kwargs: Any,
        ) -> CallInfo:
            grid = grids(img_ids, hidden_states.shape[1])
            return CallInfo(timestep, grid, encoder_hidden_states.shape[1])

        return read


@hookimpl
def tokenreduce_register(registry: Any) -> None:
    registry.add(FluxAdapter)
    registry.add_preset(
        "toma-flux",
        "tokenreduce.toma_plugin.presets",
        "toma-flux.yaml",
        "ToMA on Flux: r=0.5, facility location on 4x4 tiles, attention merge, new plans every step",
    )
