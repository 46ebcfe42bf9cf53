"""Denoisers for timing: published architectures with random weights made on the device, and their inputs.

Speed does not depend on the weight values, so the published denoisers are built on the meta
device from their configs (the architectures the adapter plugins register, see
:mod:`tokenreduce.archs`), given uninitialised storage on the target device and initialised there
in place with a seeded generator: no host copy of billions of parameters is ever made. The
``tiny-*`` architectures are the test kit's toy models, for running the harness on a CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenreduce import archs
from tokenreduce.archs import Architecture

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def names() -> list[str]:
    """Every benchmarkable architecture."""
    return sorted(archs.names())


arch_names = names


def spec(arch: str) -> Architecture:
    return archs.get(arch)


def spec_of_family(family: str) -> Architecture:
    """The first architecture an adapter registered (defaults for a pipeline of that family)."""
    found = archs.for_adapter(family)
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
    if height % s.multiple or width % s.multiple:
        raise ValueError(f"height and width must be multiples of {s.multiple} pixels, got {height}x{width}")
    gen = torch.Generator(device=device).manual_seed(seed)
    made = s.inputs(model, batch, height, width, s.text_tokens, dtype, device, gen)
    return DenoiserCall(made.args, dict(made.kwargs), made.tokens)
