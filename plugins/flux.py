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
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from tokenreduce.archs import Architecture, Inputs, random_maker
from tokenreduce.engine.runtime import Runtime
from tokenreduce.engine.sites import JOINT_TEXT_FIRST, CallInfo, StackedTransformerAdapter
from tokenreduce.engine.sites.call import Reorder
from tokenreduce.engine.sites.stack import DualStreamParams, check_blocks, check_grid, dual_stream_stacks
from tokenreduce.hookspecs import hookimpl

if TYPE_CHECKING:
    from diffusers import FluxTransformer2DModel


class FluxAdapter(StackedTransformerAdapter):
    """Flux transformer (``FluxTransformer2DModel``): double- and single-stream blocks."""

    name = "flux"
    label = "Flux"
    default_preset = "toma-flux"
    timestep_scale = 1.0  # the pipeline passes t / 1000
    stacks = dual_stream_stacks("single_split")
    rope = JOINT_TEXT_FIRST
    # Context parallelism splits hidden states and img_ids at the model's forward: the wrapper
    # reads each rank's band from its ids (see tokenreduce.parallel).
    context_parallel = True

    class Params(DualStreamParams):
        name: Literal["flux"] = "flux"
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

    params: Params

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from diffusers import FluxTransformer2DModel  # lazy: keeps plugin discovery light

        return isinstance(model, FluxTransformer2DModel)

    def reorderer(self, runtime: Runtime) -> Reorder:
        """Image tokens tile by tile for the whole call: RoPE comes out in the same order from the
        permuted ids (three small gathers per call instead of two per merged block). Positional
        ControlNet residuals (past ``joint_attention_kwargs``) are in raster order: then the tokens
        stay in raster order; keyword ones are permuted too."""

        def reorder(
            grid: tuple[int, ...], args: tuple, kwargs: dict
        ) -> tuple[tuple, dict, torch.Tensor] | None:
            if len(args) > 8:
                return None
            args_list, kwargs = list(args), dict(kwargs)
            hidden = args_list[0] if args_list else kwargs["hidden_states"]
            order = runtime.region_order(grid, hidden.device)
            if order is None:
                return None
            perm, inverse = order
            for index, name in ((0, "hidden_states"), (4, "img_ids")):
                if index < len(args_list):
                    if args_list[index] is not None:
                        args_list[index] = args_list[index].index_select(1 if index == 0 else -2, perm)
                elif kwargs.get(name) is not None:
                    kwargs[name] = kwargs[name].index_select(1 if index == 0 else -2, perm)
            for key in ("controlnet_block_samples", "controlnet_single_block_samples"):
                if kwargs.get(key) is not None:
                    kwargs[key] = [None if r is None else r.index_select(1, perm) for r in kwargs[key]]
            return tuple(args_list), kwargs, inverse

        return reorder

    def reader(self, model: nn.Module) -> Callable[..., CallInfo]:
        grids = self.id_grids()
        runs = self.params.single_placement == "run"

        def read(
            hidden_states: torch.Tensor,
            encoder_hidden_states: torch.Tensor,
            pooled_projections: Any = None,
            timestep: Any = None,
            img_ids: torch.Tensor | None = None,
            *args: Any,
            **kwargs: Any,
        ) -> CallInfo:
            if runs and kwargs.get("controlnet_single_block_samples") is not None:
                raise ValueError(
                    "Flux single_placement 'run' keeps the image tokens merged between single-stream blocks, "
                    "where ControlNet adds its single-block residuals at full length; use single_placement "
                    "'block' with a ControlNet"
                )
            grid = grids(img_ids, hidden_states.shape[1])
            return CallInfo(timestep, grid, encoder_hidden_states.shape[1])

        return read


def flux_inputs(
    model: FluxTransformer2DModel,
    batch: int,
    height: int,
    width: int,
    text_tokens: int,
    dtype: torch.dtype,
    device: Any,
    generator: torch.Generator,
) -> Inputs:
    """What the Flux pipeline passes: 2x2-packed latents (16 px per token), T5 text, pooled CLIP, ids."""
    cfg = model.config

    randn = random_maker(generator, device, dtype)

    h, w = height // 16, width // 16
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    kwargs = {
        "hidden_states": randn(batch, h * w, cfg.in_channels),
        "encoder_hidden_states": randn(batch, text_tokens, cfg.joint_attention_dim),
        "pooled_projections": randn(batch, cfg.pooled_projection_dim),
        "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),  # the pipeline passes t / 1000
        "img_ids": torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).to(dtype),
        "txt_ids": torch.zeros(text_tokens, 3, device=device, dtype=dtype),
    }
    if cfg.guidance_embeds:
        kwargs["guidance"] = torch.full((batch,), 3.5, device=device, dtype=dtype)
    return Inputs((), kwargs, h * w)


def _model() -> type[FluxTransformer2DModel]:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel


def _tiny_config() -> dict[str, Any]:
    from tokenreduce.testing.tiny_flux import tiny_flux_transformer

    return dict(tiny_flux_transformer().config)


# black-forest-labs/FLUX.1-dev, transformer/config.json
FLUX_DEV: dict[str, Any] = {
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

ARCHITECTURES = (
    Architecture(
        name="flux",
        adapter="flux",
        model=_model,
        config=FLUX_DEV,
        subfolder="transformer",
        batch=1,  # guidance is embedded
        dtype="bf16",
        size=1024,
        text_tokens=512,
        multiple=16,
        inputs=flux_inputs,
        description="Flux.1-dev transformer (12 B parameters)",
        h100=(45.0, 185.0, 180.0),
        bench_default=True,
    ),
    # The test kit's toy model, for running the benchmark on a CPU: 128 px -> an 8x8 token grid.
    Architecture(
        name="tiny-flux",
        adapter="flux",
        model=_model,
        config=_tiny_config,
        subfolder="transformer",
        batch=1,
        dtype="fp32",
        size=128,
        text_tokens=8,
        multiple=16,
        inputs=flux_inputs,
        description="the test kit's tiny Flux transformer",
    ),
)


@hookimpl
def tokenreduce_register(registry: Any) -> None:
    registry.add(FluxAdapter)
    registry.add_preset(
        "toma-flux",
        "tokenreduce.toma_plugin.presets",
        "toma-flux.yaml",
        "ToMA on Flux: r=0.5 in the second half of the steps, size-weighted, facility location on 8x8 tiles",
    )
    registry.add_preset(
        "toma-flux-fast",
        "tokenreduce.toma_plugin.presets",
        "toma-flux-fast.yaml",
        "ToMA on Flux, faster than toma-flux: r=0.75 in the second half of the steps, same components",
    )
    registry.add_preset(
        "toma-flux-run",
        "tokenreduce.toma_plugin.presets",
        "toma-flux-run.yaml",
        "toma-flux merging once around the run of single-stream blocks (opt-in: residual carried merged)",
    )
    registry.add_preset(
        "toma-flux-ff",
        "tokenreduce.toma_plugin.presets",
        "toma-flux-ff.yaml",
        "toma-flux with the double-stream blocks' image feed-forward on merged tokens too (opt-in)",
    )
    for arch in ARCHITECTURES:
        registry.add_architecture(arch)
