"""Denoisers for timing: published architectures with random weights made on the device, and their inputs.

Speed does not depend on the weight values, so the published denoisers are built on the meta
device from their configs (the architectures the adapter plugins register, see
:mod:`tokenreduce.archs`), given uninitialised storage on the target device and initialised there
in place with a seeded generator: no host copy of billions of parameters is ever made. The
``tiny-*`` architectures are the test kit's toy models, for running the harness on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenreduce import archs
from tokenreduce.archs import Architecture

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ArchSpec:
    """Benchmark defaults of an architecture registered as a bare builder (``archs.register``);
    a registered :class:`~tokenreduce.archs.Architecture` carries these itself."""

    family: str  # the adapter (preset family)
    batch: int
    dtype: str  # on CUDA; every architecture runs in fp32 on a CPU
    size: int  # image height (and width unless ``width``) in pixels
    text_tokens: int
    pixels_per_latent: int  # VAE downsampling
    width: int | None = None
    frames: int | None = None  # video frames in pixel space
    frames_per_latent: int = 4  # video VAE's temporal downsampling (after the first frame)
    restore_buffers: Callable[[nn.Module], None] | None = field(default=None, compare=False, repr=False)
    h100: tuple[float, float, float] | None = None

    @property
    def multiple(self) -> int:
        return 2 * self.pixels_per_latent


ARCHS: dict[str, ArchSpec] = {}


def register(name: str, arch_spec: ArchSpec) -> None:
    """Add the benchmark defaults of an architecture registered with ``tokenreduce.archs.register``."""
    ARCHS[name] = arch_spec


def names() -> list[str]:
    """Every benchmarkable architecture."""
    return sorted(set(archs.names()) & (set(archs.registered()) | set(ARCHS)))


arch_names = names


def spec(arch: str) -> Architecture | ArchSpec:
    known = archs.registered()  # loads the plugins
    if arch in known:
        return known[arch]
    if arch in ARCHS:
        return ARCHS[arch]
    raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(names())}")


def spec_of_family(family: str) -> Architecture | ArchSpec:
    """The first architecture an adapter registered (defaults for a pipeline of that family)."""
    found: Architecture | ArchSpec | None = archs.for_adapter(family)
    if found is None:
        found = next((a for a in ARCHS.values() if a.family == family), None)
    if found is None:
        raise ValueError(f"no architecture is registered for adapter {family!r}")
    return found


# --------------------------------------------------------------------------- models


def meta_model(arch: str) -> nn.Module:
    """The architecture with no storage (config validation and ``explain`` need nothing more)."""
    return archs.build(arch)


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
    """Real weights: a denoiser folder, or a pipeline folder / hub id with the denoiser's subfolder."""
    s = spec(arch)
    if not isinstance(s, Architecture):
        raise ValueError(f"{arch}: real weights need an architecture registered with its model class")
    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    if not (Path(path) / "config.json").is_file():
        kwargs["subfolder"] = s.subfolder
    model = s.model().from_pretrained(path, **kwargs)
    return model.to(device).eval().requires_grad_(False)


# --------------------------------------------------------------------------- inputs


class DenoiserCall:
    """Fixed inputs of one denoiser call; the same tensors every time (CUDA graphs read them in place)."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None, tokens: int = 0) -> None:
        self.args, self.kwargs, self.tokens = args, kwargs or {}, tokens

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
    if not isinstance(s, Architecture):
        if s.frames is None:
            raise ValueError(f"{arch}: no input maker is registered for this architecture")
        return _video_inputs(s, model, batch, height, width, dtype, device, seed)
    if height % s.multiple or width % s.multiple:
        raise ValueError(f"height and width must be multiples of {s.multiple} pixels, got {height}x{width}")
    gen = torch.Generator(device=device).manual_seed(seed)
    made = s.inputs(model, batch, height, width, s.text_tokens, dtype, device, gen)
    return DenoiserCall(made.args, dict(made.kwargs), made.tokens)


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
    """A video transformer's inputs: a ``(B, C, frames', H/8, W/8)`` latent, timesteps and the text
    context (one guidance pass per call, as the Wan pipelines call the transformer)."""
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
