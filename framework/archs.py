"""Published denoiser architectures, registered by the adapters that serve them.

Speed does not depend on the weight values, so ``explain`` and ``bench`` build a published
configuration (from its ``config.json`` values, empty or random weights, no download) instead of
fetching checkpoints. Each adapter plugin registers the architectures it serves, with the inputs
its pipeline passes; this module and the benchmark name none of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from diffusers import ModelMixin


@dataclass(frozen=True)
class Inputs:
    """One denoiser call's arguments (the same tensors every time: CUDA graphs read them in place)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    tokens: int = 0  # image tokens at the first merged site (for the record)


def random_maker(generator: torch.Generator, device: Any, dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    """``randn(*shape)`` drawing from ``generator`` on ``device`` in ``dtype`` (for input makers)."""

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    return randn


#: ``(model, batch, height_px, width_px, text_tokens, dtype, device, generator) -> Inputs``
InputMaker = Callable[[nn.Module, int, int, int, int, torch.dtype, Any, torch.Generator], Inputs]


@dataclass(frozen=True)
class Architecture:
    """A denoiser configuration an adapter serves, and what one generation with it looks like."""

    name: str  # e.g. "flux"; the benchmark's --arch
    adapter: str  # the adapter (and preset family: "<method>-<adapter>") that serves it
    model: Callable[[], type[ModelMixin]]  # the diffusers class (imported lazily)
    config: Mapping[str, Any] | Callable[[], Mapping[str, Any]]  # config.json values (or a maker)
    subfolder: str  # inside a pipeline folder
    batch: int  # denoiser batch of one generation (2 = classifier-free guidance in one call)
    dtype: str  # on CUDA ("fp16", "bf16"); every architecture runs in fp32 on a CPU
    size: int  # default image height and width in pixels
    text_tokens: int  # encoder sequence length the pipeline passes
    multiple: int  # height and width must be multiples of this many pixels
    inputs: InputMaker
    description: str = ""
    #: Reference timings on one H100 at the defaults, for the benchmark's time estimate:
    #: seconds to build, milliseconds per eager and per CUDA-graph denoiser call (None: unknown).
    h100: tuple[float, float, float] | None = None
    #: Timed by ``tokenreduce bench`` when no ``--arch`` is given.
    bench_default: bool = False
    width: int | None = None  # default width when not ``size``
    frames: int | None = None  # video: frames in pixel space
    #: Recomputes constant buffers (e.g. RoPE tables) on their device after ``to_empty``.
    restore_buffers: Callable[[nn.Module], None] | None = None

    @property
    def family(self) -> str:
        """The preset family (the adapter's name)."""
        return self.adapter

    def config_dict(self) -> dict[str, Any]:
        return dict(self.config() if callable(self.config) else self.config)


def names() -> list[str]:
    """Every registered architecture."""
    return list(registered())


def build(
    arch: str | Architecture,
    *,
    device: str | torch.device = "meta",
    dtype: torch.dtype = torch.float32,
    overrides: dict[str, Any] | None = None,
) -> nn.Module:
    """The denoiser of ``arch``; on the meta device it holds no memory.

    ``overrides``: config entries to change (e.g. fewer layers of the same shapes, for op counts).
    """
    spec = get(arch) if isinstance(arch, str) else arch
    context = torch.device("meta") if str(device) == "meta" else nullcontext()
    with context:
        model = spec.model().from_config({**spec.config_dict(), **(overrides or {})})
    if str(device) != "meta":
        model = model.to(device=device, dtype=dtype)
    return model.eval()


def registered() -> dict[str, Architecture]:
    from tokenreduce.manager import get_registry

    return get_registry().architectures


def get(name: str) -> Architecture:
    table = registered()
    if name not in table:
        raise ValueError(f"unknown architecture {name!r}; choose from {', '.join(sorted(names()))}")
    return table[name]


def bench_defaults() -> list[str]:
    return [name for name, a in registered().items() if a.bench_default]


def for_adapter(adapter: str) -> Architecture | None:
    """The first architecture registered for ``adapter`` (what ``explain`` shows by default)."""
    return next((a for a in registered().values() if a.adapter == adapter), None)
