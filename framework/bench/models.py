"""Denoisers for timing: published architectures with random weights made on the device, and their inputs.

Speed does not depend on the weight values, so the real SDXL-base UNet and Flux.1-dev transformer
are built on the meta device from their configs (:mod:`tokenreduce.archs`), given uninitialised
storage on the target device and initialised there in place with a seeded generator: no host
copy of 12 B parameters is ever made. ``tiny-sdxl`` and ``tiny-flux`` are the test kit's toy
models, for running the harness on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenreduce import archs

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ArchSpec:
    """Defaults of one architecture: what a generation with it looks like."""

    family: str  # "sdxl" (UNet, epsilon), "flux" (transformer, flow) or "wan" (video transformer, flow)
    batch: int  # SDXL: 2 = classifier-free guidance in one batch; Flux: guidance is embedded
    dtype: str  # on CUDA; every architecture runs in fp32 on a CPU
    size: int  # image height and width in pixels
    text_tokens: int  # encoder sequence length (CLIP 77, T5 512)
    pixels_per_latent: int  # VAE downsampling (the tiny pipelines' VAEs differ; see their docs)
    width: int | None = None  # default width when not ``size`` (video: 1280x720, 832x480)
    frames: int | None = None  # video frames in pixel space (Wan: 81 -> 21 latent frames)
    frames_per_latent: int = 4  # video VAE's temporal downsampling (after the first frame)
    # Recomputes the model's constant buffers (e.g. RoPE tables) on their device after ``to_empty``.
    restore_buffers: Callable[[nn.Module], None] | None = field(default=None, compare=False, repr=False)


ARCHS: dict[str, ArchSpec] = {
    "sdxl": ArchSpec("sdxl", batch=2, dtype="fp16", size=1024, text_tokens=77, pixels_per_latent=8),
    "flux": ArchSpec("flux", batch=1, dtype="bf16", size=1024, text_tokens=512, pixels_per_latent=8),
    # 256 px -> SDXL-shaped attention grids of 16x16 and 8x8 tokens; 128 px -> a Flux grid of 8x8 tokens.
    "tiny-sdxl": ArchSpec("sdxl", batch=2, dtype="fp32", size=256, text_tokens=8, pixels_per_latent=8),
    "tiny-flux": ArchSpec("flux", batch=1, dtype="fp32", size=128, text_tokens=8, pixels_per_latent=8),
}


def register(name: str, arch_spec: ArchSpec) -> None:
    """Add an architecture an adapter plugin provides (with ``tokenreduce.archs.register``)."""
    ARCHS[name] = arch_spec


def names() -> list[str]:
    """Every benchmarkable architecture, plugins' included."""
    archs.names()  # loads the plugins
    return list(ARCHS)


def spec(arch: str) -> ArchSpec:
    if arch not in ARCHS:
        archs.names()  # a plugin may add it
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")
    return ARCHS[arch]


# --------------------------------------------------------------------------- models


def meta_model(arch: str) -> nn.Module:
    """The architecture with no storage (config validation and ``explain`` need nothing more)."""
    family = spec(arch).family
    if arch in archs.ARCHITECTURES or arch in archs.BUILDERS:
        return archs.build(arch)
    # Tiny models: the test kit's configs, rebuilt on the meta device like the real ones.
    if family == "sdxl":
        from tokenreduce.testing.tiny_sdxl import tiny_sdxl_unet

        # Adapters validate site grids at the config's sample size: make it the benchmark's latent.
        template = tiny_sdxl_unet(sample_size=ARCHS[arch].size // ARCHS[arch].pixels_per_latent)
    else:
        from tokenreduce.testing.tiny_flux import tiny_flux_transformer

        template = tiny_flux_transformer()
    with torch.device("meta"):
        return type(template).from_config(template.config).eval()


def build_model(
    arch: str,
    device: str | torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    *,
    meta: nn.Module | None = None,
) -> nn.Module:
    """``arch`` with seeded random weights, allocated and initialised on ``device``.

    ``meta``: an already built meta-device instance to materialise (saves building it twice).
    """
    model = meta if meta is not None else meta_model(arch)
    restore = spec(arch).restore_buffers
    buffers = [name for name, _ in model.named_buffers()]
    if buffers and restore is None:  # to_empty leaves buffers uninitialised and we cannot know their values
        raise ValueError(
            f"{arch}: cannot initialise buffers {buffers[:3]} on the device; load weights instead"
        )
    # On the meta device: free. nn.Module.to, not diffusers' override, which warns about
    # fp32-only modules (these architectures have none) whenever a dtype is given.
    model = nn.Module.to(model, dtype=dtype)
    model = model.to_empty(device=device)
    init_weights_(model, seed)
    if restore is not None:
        restore(model)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def init_weights_(model: nn.Module, seed: int) -> None:
    """In place: matrices and kernels ~ N(0, 1/fan_in), 1-D weights (norms) 1, everything else 0."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if param.dim() >= 2:
            fan_in = param[0].numel()
            param.normal_(0.0, fan_in**-0.5, generator=generator)
        elif name.rsplit(".", 1)[-1] == "weight":
            param.fill_(1.0)
        else:
            param.zero_()


def load_model(arch: str, path: str, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    """Real weights: a denoiser folder, or a pipeline folder / hub id with a ``unet`` or ``transformer``."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    family = spec(arch).family
    cls, subfolder = (
        (UNet2DConditionModel, "unet") if family == "sdxl" else (FluxTransformer2DModel, "transformer")
    )
    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    if not (Path(path) / "config.json").is_file():
        kwargs["subfolder"] = subfolder
    model = cls.from_pretrained(path, **kwargs)
    return model.to(device).eval().requires_grad_(False)


# --------------------------------------------------------------------------- inputs


@dataclass
class DenoiserCall:
    """Fixed inputs of one denoiser call; the same tensors every time (CUDA graphs read them in place)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    tokens: int = 0  # image tokens at the first attention level (for the record)

    def __call__(self, model: nn.Module) -> torch.Tensor:
        return model(*self.args, **self.kwargs, return_dict=False)[0]


def make_inputs(
    arch: str,
    model: nn.Module,
    batch: int,
    height: int,
    width: int,
    dtype: torch.dtype,
    device: str | torch.device,
    seed: int = 0,
) -> DenoiserCall:
    """Random inputs of the shapes the diffusers pipelines pass (on ``device``, made there)."""
    s = spec(arch)
    cfg = model.config
    scale = s.pixels_per_latent
    if s.family == "wan":
        return _video_inputs(s, model, batch, height, width, dtype, device, seed)
    if height % (2 * scale) or width % (2 * scale):
        raise ValueError(f"height and width must be multiples of {2 * scale} pixels, got {height}x{width}")
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    if s.family == "sdxl":
        h, w = height // scale, width // scale
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        time_ids = torch.tensor([height, width, 0, 0, height, width], device=device, dtype=dtype).repeat(
            batch, 1
        )
        return DenoiserCall(
            # Positional sample and timestep, as the SDXL pipeline calls the UNet.
            args=(randn(batch, cfg.in_channels, h, w), torch.full((batch,), 500.0, device=device)),
            kwargs={
                "encoder_hidden_states": randn(batch, s.text_tokens, cfg.cross_attention_dim),
                "added_cond_kwargs": {"text_embeds": randn(batch, text_dim), "time_ids": time_ids},
            },
            tokens=(h // 2) * (w // 2),
        )
    # Flux packs 2x2 latent patches into one token: a (H/16) x (W/16) grid at 1024 px.
    h, w = height // (2 * scale), width // (2 * scale)
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).to(dtype)
    kwargs = {
        "hidden_states": randn(batch, h * w, cfg.in_channels),
        "encoder_hidden_states": randn(batch, s.text_tokens, cfg.joint_attention_dim),
        "pooled_projections": randn(batch, cfg.pooled_projection_dim),
        "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),  # the pipeline passes t / 1000
        "img_ids": img_ids,
        "txt_ids": torch.zeros(s.text_tokens, 3, device=device, dtype=dtype),
    }
    if cfg.guidance_embeds:
        kwargs["guidance"] = torch.full((batch,), 3.5, device=device, dtype=dtype)
    return DenoiserCall(args=(), kwargs=kwargs, tokens=h * w)


def _video_inputs(
    s: ArchSpec,
    model: nn.Module,
    batch: int,
    height: int,
    width: int,
    dtype: torch.dtype,
    device: str | torch.device,
    seed: int,
) -> DenoiserCall:
    """Wan: a ``(B, C, frames', H/8, W/8)`` latent, timesteps and the T5 context (one guidance pass
    per call, as the Wan pipelines call the transformer)."""
    cfg = model.config
    scale, patch = s.pixels_per_latent, tuple(cfg.patch_size)
    if height % (scale * patch[1]) or width % (scale * patch[2]):
        raise ValueError(
            f"height and width must be multiples of {scale * patch[1]} pixels, got {height}x{width}"
        )
    frames = (s.frames or 1) - 1
    latent_frames = frames // s.frames_per_latent + 1
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    h, w = height // scale, width // scale
    kwargs = {
        "hidden_states": randn(batch, cfg.in_channels, latent_frames, h, w),
        "timestep": torch.full((batch,), 500.0, device=device, dtype=dtype),
        "encoder_hidden_states": randn(batch, s.text_tokens, cfg.text_dim),
    }
    tokens = (latent_frames // patch[0]) * (h // patch[1]) * (w // patch[2])
    return DenoiserCall(args=(), kwargs=kwargs, tokens=tokens)
