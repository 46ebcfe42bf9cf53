"""Model adapter for diffusers' SDXL-style ``UNet2DConditionModel``.

Token reduction acts inside the ``BasicTransformerBlock``s of the UNet's attention levels, on the
image tokens only (text keys and values are never touched) and never on the residual stream
outside a merged computation. Sites per block:

- ``attn1``: ``U(attn1(M n))``; ``attn2``: ``U(attn2(M n, text))``; ``ff``: ``U(ff(M n))``, with
  ``n`` the normalised tokens the sub-module receives. A ``kv_only`` merger (ToDo) at ``attn1``
  runs ``attn1(n, encoder_hidden_states=M n)``: full-length queries, shortened keys/values.
- ``block``: the whole block runs on merged tokens, ``x + U(block(M x) - M x)`` (exact at r = 0).
- ``stack``: all blocks of one ``Transformer2DModel`` run on merged tokens, merged once before the
  first and unmerged once after the last: ``x + U(blocks(M x) - M x)``. SDXL has 11 such stacks for
  70 blocks, so this wraps 2 blocks per stack instead of every block: the placement that pays on a
  CPU-bound eager step (see docs/performance.md).

One plan per block and call (shared by its sites); blocks share plans per resolution level when
the reuse policy shares by kind. The grid of each level is read from the ``(B, C, H, W)`` input
of its ``Transformer2DModel``, so any latent size works (non-square, not divisible by 2^levels).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from tokenreduce.archs import Architecture, Inputs, random_maker
from tokenreduce.config import instantiate
from tokenreduce.engine import PatchSet, Runtime
from tokenreduce.engine.attention import KeyWeightsCache, SizeWeighting, route
from tokenreduce.hookspecs import hookimpl
from tokenreduce.interfaces import ModelAdapter, SiteSpec
from tokenreduce.manager import get_registry
from tokenreduce.params import AdapterParams
from tokenreduce.plugins import _unet_wrappers as w
from tokenreduce.plugins._unet_levels import UNetBlock, describe_levels, grid_at, latent_size, unet_blocks

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

    from tokenreduce.config import ConfigBase

Site = Literal["attn1", "attn2", "ff", "block", "stack"]
SITE_ORDER: tuple[Site, ...] = ("attn1", "attn2", "ff")  # execution order inside a block
DEFAULT_SITES: tuple[Site, ...] = ("stack",)

#: SDXL's VAE downsamples images 8x.
VAE_SCALE_FACTOR = 8


def level_kind(level: int) -> str:
    """The sharing-group name of a resolution level."""
    return f"level{level}"


class SDXLAdapter(ModelAdapter):
    name = "sdxl"
    default_preset = "toma-sdxl"
    kv_only_sites = True  # attn1: full-length queries over shortened keys/values

    class Params(AdapterParams):
        name: Literal["sdxl"] = "sdxl"
        # "stack" is the default: the fastest placement measured in both eager and captured modes, and
        # equal to per-block merging when merge-after-unmerge is the identity (docs/performance.md).
        sites: list[Site] = Field(
            default_factory=lambda: list(DEFAULT_SITES),
            min_length=1,
            description=(
                "Where tokens are merged: any of 'attn1' (self-attention), 'attn2' (cross-attention "
                "queries), 'ff' (feed-forward) in each block; or alone 'block' (each whole block) or 'stack' "
                "(all blocks of a Transformer2DModel, merged once and unmerged once)."
            ),
        )
        levels: list[int] | None = Field(
            None,
            description=(
                "Resolution levels to merge, 0 = the highest-resolution level with attention "
                "(SDXL: 0 = 64x64, 1 = 32x32 tokens at 1024x1024); None = every level with attention."
            ),
        )
        max_downsample: int | None = Field(
            None,
            ge=1,
            description=(
                "Merge only levels downsampled at most this much relative to the latent (1, 2, 4, 8 as in "
                "ToMeSD; SDXL's first attention level is already at 2). None = no limit. Combines with `levels`."
            ),
        )
        features: Literal["normed", "block_input"] = Field(
            "normed",
            description=(
                "Tokens that drive selection and merge weights: 'normed' = what the site receives (for "
                "'block', the block's first norm of its input); 'block_input' = the block's raw input "
                "(as ToMeSD computes its matching)."
            ),
        )

        @model_validator(mode="after")
        def _check_sites(self) -> SDXLAdapter.Params:
            if len(set(self.sites)) != len(self.sites):
                raise ValueError(f"sites lists a site twice: {self.sites}")
            for whole in ("block", "stack"):
                if whole in self.sites and len(self.sites) > 1:
                    raise ValueError(f"site {whole!r} already covers attn1, attn2 and ff; use it alone")
            return self

    params: Params

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from diffusers import UNet2DConditionModel

        return isinstance(model, UNet2DConditionModel)

    # ------------------------------------------------------------------ validation (no changes)

    def check(self, config: ConfigBase) -> None:
        merger = get_registry().get("merger", config.merger.name)
        if merger.kv_only and self.params.sites != ["attn1"]:
            raise ValueError(
                f"merger {merger.name!r} only shortens self-attention keys/values: use sites ['attn1'], "
                f"not {self.params.sites}"
            )

    def selected_blocks(self, model: nn.Module) -> list[UNetBlock]:
        """The transformer blocks the level filters select (``ValueError`` if none)."""
        blocks = unet_blocks(model)
        if not blocks:
            raise ValueError(
                f"{type(model).__name__} has no BasicTransformerBlock inside a Transformer2DModel"
            )
        p = self.params
        existing = describe_levels(blocks, latent_size(model))
        unknown = sorted(set(p.levels or ()) - {b.level for b in blocks})
        if unknown:
            raise ValueError(f"levels {unknown} do not exist; levels with attention: {existing}")
        chosen = [
            b
            for b in blocks
            if (p.levels is None or b.level in p.levels)
            and (p.max_downsample is None or b.downsample <= p.max_downsample)
        ]
        if not chosen:
            raise ValueError(
                f"levels={p.levels}, max_downsample={p.max_downsample} select no transformer block; "
                f"levels with attention: {existing}"
            )
        return chosen

    def validate(self, model: nn.Module, config: ConfigBase) -> None:
        self.check(config)
        sites = self.params.sites
        for b in self.selected_blocks(model):
            if self.params.size_weighting and {"attn1", "block", "stack"} & set(sites):
                try:
                    route(b.block.attn1)
                except ValueError as exc:
                    raise ValueError(f"{b.path}.attn1: {exc}") from None
            if "attn2" in sites and b.block.attn2 is None:
                raise ValueError(f"{b.path} has no cross-attention (attn2)")
            if b.block._chunk_size is not None and ({"ff", "block", "stack"} & set(sites)):
                fix = (
                    "`unet.disable_forward_chunking()`"
                    if hasattr(model, "disable_forward_chunking")
                    else "`block.set_chunk_feed_forward(None)` on every BasicTransformerBlock"
                )
                raise ValueError(
                    f"feed-forward chunking is enabled on {b.path}; sites 'ff' and 'block' need whole token "
                    f"sequences: disable it with {fix} before applying"
                )
            if (
                sites in (["block"], ["stack"])
                and self.params.features == "normed"
                and b.block.norm_type != "layer_norm"
            ):
                raise ValueError(
                    f"{b.path} uses norm_type {b.block.norm_type!r}; site {sites[0]!r} with features 'normed' "
                    "needs 'layer_norm' blocks (use features 'block_input')"
                )

    def sites(self, model: nn.Module, config: ConfigBase) -> list[SiteSpec]:
        by_kind = instantiate("reuse", config.reuse).sharing == "kind"
        latent = latent_size(model)
        specs = []
        for b in self.selected_blocks(model):
            group = level_kind(b.level) if by_kind else b.path
            grid = grid_at(latent, b.downsample)
            for site in self.params.sites:
                path = b.path if site in ("block", "stack") else f"{b.path}.{site}"
                specs.append(SiteSpec(path=path, site=site, group=group, grid=grid))
        return specs

    def grids_for(self, model: nn.Module, height: int, width: int, **size: int) -> dict[str, tuple[int, ...]]:
        """Token grid per group (level kinds and block paths) for an image of ``height x width`` pixels."""
        if size:
            raise TypeError(f"unexpected size arguments {sorted(size)}; SDXL grids take height and width")
        latent = (height // VAE_SCALE_FACTOR, width // VAE_SCALE_FACTOR)
        grids: dict[str, tuple[int, ...]] = {}
        for b in unet_blocks(model):
            grids[level_kind(b.level)] = grids[b.path] = grid_at(latent, b.downsample)
        return grids

    # ------------------------------------------------------------------ installation

    def install(self, model: nn.Module, runtime: Runtime, patches: PatchSet) -> None:
        blocks = self.selected_blocks(model)
        sites = [s for s in SITE_ORDER if s in self.params.sites]
        from_input = self.params.features == "block_input"
        latent = latent_size(model)
        cells: dict[int, w.GridCell] = {}
        stacks: dict[int, w.StackCell] = {}
        weights: dict[str, KeyWeightsCache] = {}  # per group: key weights built once per plan
        for i, b in enumerate(blocks):
            group = runtime.group(level_kind(b.level), b.path, i / max(len(blocks) - 1, 1))
            grid = cells.get(id(b.transformer))
            if grid is None:
                grid = cells[id(b.transformer)] = w.GridCell(grid_at(latent, b.downsample))
                patches.wrap_forward(b.transformer, w.track_grid(runtime, grid))
                if hasattr(b.transformer, "_get_output_for_continuous_inputs") and getattr(
                    b.transformer, "is_input_continuous", False
                ):
                    # Tokens tile by tile inside the merged stack (folded into the model's own reshape).
                    t = b.transformer
                    patches.wrap_method(
                        t, "_operate_on_continuous_inputs", w.tokens_in_tiles(runtime, t, grid)
                    )
                    patches.wrap_method(t, "_get_output_for_continuous_inputs", w.tokens_from_tiles(t, grid))
            source = None if from_input else b.block.norm1
            if self.params.sites == ["stack"]:
                stack = [s.block for s in blocks if s.transformer is b.transformer]
                if b.block is stack[0]:
                    stacks[id(b.transformer)] = w.StackCell(weights.setdefault(group.name, KeyWeightsCache()))
                cell = stacks[id(b.transformer)]
                self._weigh_attn1(b, runtime, cell, patches)
                if b.block is stack[0]:
                    enter = w.stack_enter(runtime, group, grid, cell, source, last=len(stack) == 1)
                    patches.wrap_forward(b.block, enter)
                elif b.block is stack[-1]:
                    patches.wrap_forward(b.block, w.stack_exit(runtime, cell))
                continue
            if not sites:  # the whole block
                cell = w.StackCell(weights.setdefault(group.name, KeyWeightsCache()))
                self._weigh_attn1(b, runtime, cell, patches)
                patches.wrap_forward(b.block, w.whole_block(runtime, group, grid, source, cell))
                continue
            plan_cell = w.PlanCell()
            if from_input:
                patches.wrap_forward(b.block, w.plan_at_block_input(runtime, group, grid, plan_cell))
            site_factory = w.kv_only_site if group.merger.kv_only else w.merged_site
            for j, site in enumerate(sites):
                plans = j == 0 and not from_input
                make = site_factory(runtime, group, grid, plan_cell, plans)
                if site == "attn1" and self.params.size_weighting and not group.merger.kv_only:
                    weighting = SizeWeighting(b.block.attn1, patches)
                    cache = weights.setdefault(group.name, KeyWeightsCache())
                    make = w.merged_site(runtime, group, grid, plan_cell, plans, (weighting, cache))
                patches.wrap_forward(getattr(b.block, site), make)
        patches.wrap_forward(model, w.begin_denoiser_call(runtime))
        self._build_host_state(model, runtime, {grid.grid for grid in cells.values()})

    def _weigh_attn1(self, b: UNetBlock, runtime: Runtime, cell: w.StackCell, patches: PatchSet) -> None:
        """With size weighting: the block's self-attention weighs keys by the running plan's sizes."""
        if self.params.size_weighting:
            weighting = SizeWeighting(b.block.attn1, patches)
            patches.wrap_forward(b.block.attn1, w.weighted_self_attention(runtime, cell, weighting))

    @staticmethod
    def _build_host_state(model: nn.Module, runtime: Runtime, grids: set[tuple[int, int]]) -> None:
        """Build what the first call would build lazily (the default grids' layouts on the model's
        device, the selectors' generator and noise counter), so that a model compiled right after ``apply`` traces
        no set-up code. Other resolutions need one eager call before compiled calls."""
        device = next(model.parameters()).device
        if device.type == "meta":
            return
        runtime.generator(device)
        runtime.draws(device)
        for grid in grids:
            runtime.prepare_grid(grid, device)


def unet_inputs(
    model: UNet2DConditionModel,
    batch: int,
    height: int,
    width: int,
    text_tokens: int,
    dtype: torch.dtype,
    device: Any,
    generator: torch.Generator,
) -> Inputs:
    """What the SDXL pipeline passes: the latent (8x VAE), timestep, text states, added conditioning."""
    cfg = model.config

    randn = random_maker(generator, device, dtype)

    h, w = height // VAE_SCALE_FACTOR, width // VAE_SCALE_FACTOR
    text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    time_ids = torch.tensor([height, width, 0, 0, height, width], device=device, dtype=dtype).repeat(batch, 1)
    return Inputs(
        # Positional sample and timestep, as the SDXL pipeline calls the UNet.
        args=(randn(batch, cfg.in_channels, h, w), torch.full((batch,), 500.0, device=device)),
        kwargs={
            "encoder_hidden_states": randn(batch, text_tokens, cfg.cross_attention_dim),
            "added_cond_kwargs": {"text_embeds": randn(batch, text_dim), "time_ids": time_ids},
        },
        tokens=(h // 2) * (w // 2),
    )


def _model() -> type[UNet2DConditionModel]:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel


def _tiny_config() -> dict[str, Any]:
    from tokenreduce.testing.tiny_sdxl import tiny_sdxl_unet

    # Adapters validate site grids at the config's sample size: make it the benchmark's latent (256 px).
    return dict(tiny_sdxl_unet(sample_size=256 // VAE_SCALE_FACTOR).config)


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

ARCHITECTURES = (
    Architecture(
        name="sdxl",
        adapter="sdxl",
        model=_model,
        config=SDXL_BASE_UNET,
        subfolder="unet",
        batch=2,  # classifier-free guidance in one batch
        dtype="fp16",
        size=1024,
        text_tokens=77,
        multiple=16,
        inputs=unet_inputs,
        description="SDXL-base UNet (2.6 B parameters)",
        h100=(20.0, 130.0, 50.0),
        bench_default=True,
    ),
    # The test kit's toy model, for running the benchmark on a CPU: 256 px -> grids of 16x16 and 8x8.
    Architecture(
        name="tiny-sdxl",
        adapter="sdxl",
        model=_model,
        config=_tiny_config,
        subfolder="unet",
        batch=2,
        dtype="fp32",
        size=256,
        text_tokens=8,
        multiple=16,
        inputs=unet_inputs,
        description="the test kit's tiny SDXL-shaped UNet",
    ),
)


@hookimpl
def tokenreduce_register(registry: Any) -> None:
    registry.add(SDXLAdapter)
    for arch in ARCHITECTURES:
        registry.add_architecture(arch)
    registry.add_preset(
        "toma-sdxl",
        "tokenreduce.toma_plugin.presets",
        "toma-sdxl.yaml",
        "ToMA on SDXL: r=0.5 in the second half of the steps, facility location on 8x8 tiles, new plans every merged step",
    )
    registry.add_preset(
        "toma-sdxl-fast",
        "tokenreduce.toma_plugin.presets",
        "toma-sdxl-fast.yaml",
        "ToMA on SDXL, faster than toma-sdxl: r=0.75 in the second half of the steps, same components",
    )
    registry.add_preset(
        "toma-sdxl-block",
        "tokenreduce.toma_plugin.presets",
        "toma-sdxl-block.yaml",
        "ToMA on SDXL merging each transformer block separately (placement 'block'), for comparison",
    )
    registry.add_preset(
        "toma",
        "tokenreduce.toma_plugin.presets",
        "toma.yaml",
        "ToMA components with the adapter picked from the model (any supported denoiser), merging at every step",
    )
