"""Wan adapter: token merging in ``WanTransformer3DModel`` (Wan 2.1 / 2.2, text- and image-to-video).

A thin spec on the site library's cross-attention block
(:mod:`tokenreduce.engine.sites.cross_attention`):

- **Sites**: every ``WanTransformerBlock`` in ``blocks`` after the first ``skip``; its ``attn1``
  (self-attention over video tokens, RoPE inside), ``attn2`` (cross-attention: merged queries,
  text and image-to-video's image-context tokens untouched) and ``ffn`` each run on merged tokens
  and are unmerged right after; residuals, norms, modulation and gates stay full length.
- **Grid**: ``(frames, rows, cols)`` after patchify, from the shape of the latent the transformer
  receives (``(B, C, F, H, W)`` and the config's patch size): no device read, so compiled calls
  need nothing extra.
- **RoPE**: Wan passes ``rotary_emb = (cos, sin)`` of shape ``(1, N, 1, D)`` to ``attn1``; merged
  tokens take their destination's rows.
- **Plans**: one per block and call, computed from ``attn1``'s normalised tokens; shared by every
  merged block (one group, ``blocks``) when the reuse policy shares by kind.

Gradient checkpointing is not supported while merging (a clear error is raised).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from tokenreduce.api import begin_call
from tokenreduce.archs import Architecture, Inputs, random_maker
from tokenreduce.config import ConfigBase, instantiate
from tokenreduce.engine.attention import route
from tokenreduce.engine.patch import PatchSet
from tokenreduce.engine.runtime import Runtime
from tokenreduce.engine.sites import CROSS_ATTENTION_PARTS, CallState, CrossAttentionBlock, RopeArg
from tokenreduce.hookspecs import hookimpl
from tokenreduce.interfaces import ModelAdapter, SiteSpec
from tokenreduce.manager import get_registry
from tokenreduce.params import AdapterParams

if TYPE_CHECKING:
    from diffusers import WanTransformer3DModel

GROUP = "blocks"
Part = Literal["attn1", "attn2", "ffn"]
#: Wan 2.1's VAE: 4x in time (plus the first frame), 8x in space.
VAE_STRIDE = (4, 8, 8)

# Published transformer configs (Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers, transformer/config.json).
_WAN21_COMMON: dict[str, Any] = {
    "attention_head_dim": 128,
    "cross_attn_norm": True,
    "eps": 1e-06,
    "freq_dim": 256,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "in_channels": 16,
    "out_channels": 16,
    "patch_size": [1, 2, 2],
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024,
    "text_dim": 4096,
}
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "wan-1.3b": _WAN21_COMMON | {"num_attention_heads": 12, "num_layers": 30, "ffn_dim": 8960},
    "wan-14b": _WAN21_COMMON | {"num_attention_heads": 40, "num_layers": 40, "ffn_dim": 13824},
}


def latent_grid(
    frames: int, height: int, width: int, patch: tuple[int, ...], vae: tuple[int, ...] = VAE_STRIDE
) -> tuple[int, int, int]:
    """Token grid of a ``frames x height x width`` pixel video: VAE (first frame + 4x time, 8x
    space), then patches."""
    lf = (frames - 1) // vae[0] + 1
    return (lf // patch[0], height // vae[1] // patch[1], width // vae[2] // patch[2])


def wrap_transformer(
    model: WanTransformer3DModel, runtime: Runtime, state: CallState
) -> Callable[[Any], Any]:
    """The denoiser's forward: advance the step clock and set this call's token grid."""
    patch = tuple(model.config.patch_size)

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def forward(hidden_states: torch.Tensor, timestep: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if runtime.switched_on:  # the clock runs on steps that do not merge too
                begin_call(runtime, timestep)
            if not runtime.enabled:
                return original(hidden_states, timestep, *args, **kwargs)
            if model.gradient_checkpointing and torch.is_grad_enabled():
                raise ValueError(
                    "Wan token merging does not support gradient checkpointing; disable one of them"
                )
            _, _, f, h, w = hidden_states.shape
            state.begin((f // patch[0], h // patch[1], w // patch[2]))
            try:
                return original(hidden_states, timestep, *args, **kwargs)
            finally:
                state.on = False

        return forward

    return make


class WanAdapter(ModelAdapter):
    """``WanTransformer3DModel``: self-attention + cross-attention + FFN blocks on video tokens."""

    name = "wan"
    grid_rank = 3
    default_preset = "toma-wan"

    class Params(AdapterParams):
        name: Literal["wan"] = "wan"
        skip: int = Field(0, ge=0, description="The first N transformer blocks are not merged.")
        blocks: list[int] | None = Field(
            None,
            description="Explicit block indices to merge; overrides `skip`. Default: every block after `skip`.",
        )
        parts: list[Part] = Field(
            default_factory=lambda: list(CROSS_ATTENTION_PARTS),
            min_length=1,
            description="Parts of each block run on merged tokens: any of 'attn1', 'attn2', 'ffn'.",
        )

        @field_validator("blocks")
        @classmethod
        def _check_blocks(cls, value: list[int] | None) -> list[int] | None:
            if value is not None and any(i < 0 for i in value):
                raise ValueError(f"block indices must be >= 0, got {value}")
            return value

        @field_validator("parts")
        @classmethod
        def _check_parts(cls, value: list[str]) -> list[str]:
            if len(set(value)) != len(value):
                raise ValueError(f"parts lists a part twice: {value}")
            return value

    params: Params

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from diffusers import WanTransformer3DModel  # lazy: keeps plugin discovery light

        return isinstance(model, WanTransformer3DModel)

    def selected(self, model: WanTransformer3DModel) -> list[int]:
        n = len(model.blocks)
        if self.params.blocks is None:
            return list(range(self.params.skip, n))
        return sorted(i for i in set(self.params.blocks) if i < n)

    def check(self, config: ConfigBase) -> None:
        merger = get_registry().get("merger", config.merger.name)
        if merger.kv_only:
            raise ValueError(
                f"kv_only mergers are not supported on Wan: merger {merger.name!r} only shortens keys/values, "
                "while the wan adapter merges the video tokens themselves and needs a merger that can unmerge"
            )

    def validate(self, model: WanTransformer3DModel, config: ConfigBase) -> None:
        self.check(config)
        n = len(model.blocks)
        if self.params.blocks is not None and any(i >= n for i in self.params.blocks):
            raise ValueError(
                f"blocks {self.params.blocks} out of range: the model has {n} blocks (0..{n - 1})"
            )
        if not self.selected(model):
            raise ValueError(
                f"the block filter selects none of the model's {n} blocks (skip={self.params.skip})"
            )
        if self.params.size_weighting and "attn1" in self.params.parts:
            for i in self.selected(model):
                try:
                    route(model.blocks[i].attn1)
                except ValueError as exc:
                    raise ValueError(f"blocks.{i}.attn1: {exc}") from None

    def sites(self, model: WanTransformer3DModel, config: ConfigBase) -> list[SiteSpec]:
        per_block = instantiate("reuse", config.reuse).sharing == "block"
        specs = []
        for i in self.selected(model):
            group = f"blocks.{i}" if per_block else GROUP
            for part in self.params.parts:
                specs.append(SiteSpec(path=f"blocks.{i}.{part}", site=part, group=group, grid=None))
        return specs

    def grids_for(
        self, model: WanTransformer3DModel, height: int, width: int, frames: int = 81, **size: int
    ) -> dict[str, tuple[int, ...]]:
        """Token grid per group for a ``frames``-frame video of ``height x width`` pixels (Wan 2.1 VAE)."""
        if size:
            raise TypeError(
                f"unexpected size arguments {sorted(size)}; Wan grids take height, width and frames"
            )
        grid: tuple[int, ...] = latent_grid(frames, height, width, tuple(model.config.patch_size))
        return {GROUP: grid} | {f"blocks.{i}": grid for i in self.selected(model)}

    def install(self, model: WanTransformer3DModel, runtime: Runtime, patches: PatchSet) -> None:
        state = CallState()
        chosen = self.selected(model)
        rope = RopeArg(name="rotary_emb", position=3, token_dim=1)
        for place, i in enumerate(chosen):
            block = model.blocks[i]
            position = place / (len(chosen) - 1) if len(chosen) > 1 else 0.0
            group = runtime.group(GROUP, f"blocks.{i}", position)
            site = CrossAttentionBlock(
                state, runtime, group, self.params.parts, rope, self.params.size_weighting
            )
            site.install(patches, {"attn1": block.attn1, "attn2": block.attn2, "ffn": block.ffn})
        patches.wrap_forward(model, wrap_transformer(model, runtime, state))


# --------------------------------------------------------------------------- published architectures


def restore_rope(model: WanTransformer3DModel) -> None:
    """Rebuild the RoPE tables (constant, not weights) on the model's device, in float32 as Wan keeps them."""
    rope = model.rope
    device = next(model.parameters()).device
    with torch.device(device):
        model.rope = type(rope)(rope.attention_head_dim, rope.patch_size, rope.max_seq_len)


def wan_inputs(
    model: WanTransformer3DModel,
    batch: int,
    height: int,
    width: int,
    text_tokens: int,
    dtype: torch.dtype,
    device: Any,
    generator: torch.Generator,
    *,
    frames: int,
) -> Inputs:
    """What the Wan pipelines pass (one guidance pass per call): a ``(B, C, frames', H/8, W/8)``
    latent of a ``frames``-frame video, timesteps in [0, 1000] and the T5 context."""
    cfg = model.config
    patch = tuple(cfg.patch_size)

    randn = random_maker(generator, device, dtype)

    latent_frames = (frames - 1) // VAE_STRIDE[0] + 1
    h, w = height // VAE_STRIDE[1], width // VAE_STRIDE[2]
    kwargs = {
        "hidden_states": randn(batch, cfg.in_channels, latent_frames, h, w),
        "timestep": torch.full((batch,), 500.0, device=device, dtype=dtype),
        "encoder_hidden_states": randn(batch, text_tokens, cfg.text_dim),
    }
    grid = latent_grid(frames, height, width, patch)
    return Inputs((), kwargs, grid[0] * grid[1] * grid[2])


def _model() -> type[WanTransformer3DModel]:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel


def _tiny_config() -> dict[str, Any]:
    from tokenreduce.testing.tiny_wan import tiny_wan_transformer

    return dict(tiny_wan_transformer().config)


def _architectures() -> tuple[Architecture, ...]:
    # One guidance pass per call (the Wan pipelines call the transformer for cond and uncond apart);
    # 81 frames; T5 context of 512 tokens. 1.3B is published for 480p, 14B for 720p.
    common: dict[str, Any] = {
        "adapter": "wan",
        "model": _model,
        "subfolder": "transformer",
        "batch": 1,
        "multiple": 16,  # 8x VAE, 2x2 patches
        "restore_buffers": restore_rope,
    }
    video: dict[str, Any] = {"dtype": "bf16", "text_tokens": 512, "frames": 81}
    return (
        Architecture(
            name="wan-1.3b",
            config=ARCHITECTURES["wan-1.3b"],
            size=480,
            width=832,
            inputs=functools.partial(wan_inputs, frames=81),
            description="Wan 2.1 text-to-video 1.3B transformer (81 frames at 480p)",
            **common,
            **video,
        ),
        Architecture(
            name="wan-14b",
            config=ARCHITECTURES["wan-14b"],
            size=720,
            width=1280,
            inputs=functools.partial(wan_inputs, frames=81),
            description="Wan 2.1 text-to-video 14B transformer (81 frames at 720p)",
            **common,
            **video,
        ),
        # The test kit's tiny model, for running the benchmark on a CPU: 9 frames -> 3 x 9 x 10 tokens.
        Architecture(
            name="tiny-wan",
            config=_tiny_config,
            size=144,
            width=160,
            dtype="fp32",
            text_tokens=8,
            frames=9,
            inputs=functools.partial(wan_inputs, frames=9),
            description="the test kit's tiny Wan transformer",
            **common,
        ),
    )


@hookimpl
def tokenreduce_register(registry: Any) -> None:
    registry.add(WanAdapter)
    for arch in _architectures():
        registry.add_architecture(arch)
    registry.add_preset(
        "toma-wan",
        "tokenreduce.toma_plugin.presets",
        "toma-wan.yaml",
        "ToMA on Wan video (chosen on the Wan-shaped proxy only): r=0.5, facility location with jitter 0.5 on 8x8 tiles "
        "within a frame, attention merge, second half of the steps",
    )
    registry.add_preset(
        "toma-wan-fast",
        "tokenreduce.toma_plugin.presets",
        "toma-wan-fast.yaml",
        "ToMA on Wan video, faster than toma-wan: r=0.75 in the second half of the steps, same components",
    )
