"""Whole-generation timing: text encoders, every denoising step and the VAE, variants interleaved.

Reported separately from the denoiser step (PERFORMANCE.md). The configs are applied to the
pipeline itself, so the scheduler drives the reuse schedule as in normal use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from tokenreduce import archs
from tokenreduce.api import apply
from tokenreduce.bench.timing import Stopwatch, Timings, describe_error
from tokenreduce.bench.variants import Variant


def pipeline_family(pipe: Any) -> str:
    """The adapter (preset family) whose registered architecture is this pipeline's denoiser."""
    for arch in archs.registered().values():
        module = getattr(pipe, arch.subfolder, None)
        if module is not None and isinstance(module, arch.model()):
            return arch.adapter
    raise ValueError(f"{type(pipe).__name__}'s denoiser is not a registered architecture's class")


def family_of_pipeline_folder(model: str) -> str:
    """The adapter (preset family) from a pipeline's ``model_index.json`` (read before loading any weights)."""
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(model)
    for arch in archs.registered().values():
        entry = index.get(arch.subfolder)
        if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] == arch.model().__name__:
            return arch.adapter
    raise ValueError(f"{model!r} is a pipeline whose denoiser is not a registered architecture's class")


def denoiser_of(pipe: Any) -> torch.nn.Module:
    family = pipeline_family(pipe)
    arch = next(a for a in archs.registered().values() if a.adapter == family)
    return getattr(pipe, arch.subfolder)


def load_pipeline(model: str, device: str, dtype: torch.dtype) -> Any:
    from tokenreduce.generate import load_pipeline as load

    pipe = load(model, device, dtype)
    pipe.set_progress_bar_config(disable=True)  # ours counts generations
    return pipe


@torch.no_grad()
def time_pipeline(
    pipe: Any,
    variants: Sequence[Variant],
    rounds: int,
    warmup: int,
    device: str | torch.device,
    call_kwargs: dict[str, Any],
    seed: int = 0,
    advance: Callable[[], None] | None = None,
) -> Timings:
    """Milliseconds per generation of every variant, interleaved round by round (same seed each time)."""
    watch = Stopwatch(device)
    out = Timings(samples={v.name: [] for v in variants})
    active = list(variants)

    def generate() -> None:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        pipe(generator=generator, **call_kwargs)

    for rnd in range(-warmup, rounds):
        for variant in list(active):
            handle = None
            try:
                if variant.config is not None:
                    handle = apply(pipe, variant.config)
                ms = watch(generate)
            except Exception as exc:  # one broken variant must not end a long benchmark
                out.errors[variant.name] = describe_error(exc)
                active.remove(variant)
                continue
            finally:
                if handle is not None:
                    handle.remove()
            out.log.append((rnd, variant.name))
            if rnd >= 0:
                out.samples[variant.name].append(ms)
            if advance is not None:
                advance()
    return out
