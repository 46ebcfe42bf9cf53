"""Flux.2 adapter: token merging in ``Flux2Transformer2DModel``'s double- and single-stream blocks.

- **Double-stream blocks**: a joint-attention image stream (as Flux): ``attn`` gets merged image
  tokens, joint attention over ``[text; merged image]``, image output unmerged after ``to_out``.
- **Single-stream blocks** (fused form): the block's ``attn`` fuses QKV with the MLP input and the
  attention output with the MLP output; it is wrapped alone, so attention *and* MLP run on
  ``[text; merged image]`` and the image part of its output is unmerged before gate and residual.
- **RoPE**: one ``(cos, sin)`` table over ``[text; image]`` (4 axes); merged tokens take their
  destinations' rows, built once per plan and call.

Token grid: ``grid`` from the parameters, else read from ``img_ids`` (``(N, 4)``: time, row,
column, layer; raster order) once per distinct tensor; compiled calls use the grid last read or
prepared for the same token count. Reference-image conditioning (``kv_cache_mode``, or reference
tokens appended to the image tokens) is not supported while merging: a clear error is raised.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from tokenreduce.archs import Architecture, Inputs, random_maker
from tokenreduce.engine.sites import JOINT_TEXT_FIRST, CallInfo, StackedTransformerAdapter
from tokenreduce.engine.sites.stack import DualStreamParams, check_blocks, check_grid, dual_stream_stacks
from tokenreduce.hookspecs import hookimpl

if TYPE_CHECKING:
    from diffusers import Flux2Transformer2DModel


class Flux2Adapter(StackedTransformerAdapter):
    """Flux.2 transformer (``Flux2Transformer2DModel``): double- and single-stream blocks."""

    name = "flux2"
    label = "Flux.2"
    default_preset = "toma-flux2"
    timestep_scale = 1.0  # the pipeline passes t / 1000
    stacks = dual_stream_stacks("single_fused")
    rope = JOINT_TEXT_FIRST

    class Params(DualStreamParams):
        name: Literal["flux2"] = "flux2"
        skip_double: int = Field(2, ge=0, description="The first N double-stream blocks are not merged.")
        blocks: list[int] | None = Field(
            None, description="Explicit blocks, as indices into [double blocks..., single blocks...]."
        )
        grid: list[int] | None = Field(
            None, description="[H, W] image-token grid. Default: read from img_ids."
        )

        @field_validator("blocks")
        @classmethod
        def _check_blocks(cls, value: list[int] | None) -> list[int] | None:
            return check_blocks(value)

        @field_validator("grid")
        @classmethod
        def _check_grid(cls, value: list[int] | None) -> list[int] | None:
            return check_grid(value)

    params: Params

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from diffusers import Flux2Transformer2DModel

        return isinstance(model, Flux2Transformer2DModel)

    def reader(self, model: nn.Module) -> Callable[..., CallInfo]:
        grids = self.id_grids()

        def read(
            hidden_states: torch.Tensor,
            encoder_hidden_states: torch.Tensor,
            timestep: Any = None,
            img_ids: torch.Tensor | None = None,
            *args: Any,
            kv_cache_mode: str | None = None,
            **kwargs: Any,
        ) -> CallInfo:
            if kv_cache_mode is not None:
                raise ValueError(
                    "Flux.2 token merging does not support reference-image KV caching (kv_cache_mode)"
                )
            return CallInfo(timestep, grids(img_ids, hidden_states.shape[1]), encoder_hidden_states.shape[1])

        return read


def position_ids(t: int, h: int, w: int, layers: int, device: Any, dtype: torch.dtype) -> torch.Tensor:
    """``(t*h*w*layers, 4)`` Flux.2 ids (time, row, column, layer), as the pipeline builds them."""
    axes = [torch.arange(n, device=device) for n in (t, h, w, layers)]
    return torch.cartesian_prod(*axes).to(dtype)


def flux2_inputs(
    model: Flux2Transformer2DModel,
    batch: int,
    height: int,
    width: int,
    text_tokens: int,
    dtype: torch.dtype,
    device: Any,
    generator: torch.Generator,
) -> Inputs:
    """What the Flux.2 pipeline passes: 2x2-packed latents (16 px per token), text, ids, guidance."""
    cfg = model.config

    randn = random_maker(generator, device, dtype)

    h, w = height // 16, width // 16
    kwargs = {
        "hidden_states": randn(batch, h * w, cfg.in_channels),
        "encoder_hidden_states": randn(batch, text_tokens, cfg.joint_attention_dim),
        "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),  # the pipeline passes t / 1000
        "img_ids": position_ids(1, h, w, 1, device, dtype),
        "txt_ids": position_ids(1, 1, 1, text_tokens, device, dtype),
    }
    if cfg.guidance_embeds:
        kwargs["guidance"] = torch.full((batch,), 4.0, device=device, dtype=dtype)
    return Inputs((), kwargs, h * w)


def _model() -> type[Flux2Transformer2DModel]:
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel


def _tiny_config() -> dict[str, Any]:
    from tokenreduce.testing.tiny_flux2 import tiny_flux2_transformer

    return dict(tiny_flux2_transformer().config)


# black-forest-labs/FLUX.2-dev, transformer/config.json
FLUX2_DEV: dict[str, Any] = {
    "attention_head_dim": 128,
    "axes_dims_rope": [32, 32, 32, 32],
    "eps": 1e-06,
    "guidance_embeds": True,
    "in_channels": 128,
    "joint_attention_dim": 15360,
    "mlp_ratio": 3.0,
    "num_attention_heads": 48,
    "num_layers": 8,
    "num_single_layers": 48,
    "patch_size": 1,
    "rope_theta": 2000,
    "timestep_guidance_channels": 256,
}


@hookimpl
def tokenreduce_register(registry: Any) -> None:
    registry.add(Flux2Adapter)
    registry.add_preset(
        "toma-flux2",
        "tokenreduce.toma_plugin.presets",
        "toma-flux2.yaml",
        "ToMA on Flux.2: r=0.5 after the first 2 double and 5 single blocks, second half of the steps",
    )
    registry.add_architecture(
        Architecture(
            name="flux2-dev",
            adapter="flux2",
            model=_model,
            config=FLUX2_DEV,
            subfolder="transformer",
            batch=1,  # guidance is embedded
            dtype="bf16",
            size=1024,
            text_tokens=512,
            multiple=16,
            inputs=flux2_inputs,
            description="Flux.2-dev transformer (32 B parameters)",
        )
    )
    # The test kit's toy model, for running the benchmark on a CPU: 128 px -> an 8x8 token grid.
    registry.add_architecture(
        Architecture(
            name="tiny-flux2",
            adapter="flux2",
            model=_model,
            config=_tiny_config,
            subfolder="transformer",
            batch=1,
            dtype="fp32",
            size=128,
            text_tokens=8,
            multiple=16,
            inputs=flux2_inputs,
            description="the test kit's tiny Flux.2 transformer",
        )
    )
