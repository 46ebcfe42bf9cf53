"""Context parallelism (diffusers' ``enable_parallelism`` with a ``ContextParallelConfig``).

How diffusers splits the sequence: the model's ``_cp_plan`` names modules whose inputs are cut
into equal contiguous chunks along the token axis, one chunk per rank (``tensor.chunk(world)``,
rank order of the flattened ring x Ulysses mesh), and a module whose output is all-gathered back
(``proj_out``). Between the two, every layer (norms, MLPs, modulation) sees only its rank's chunk;
only attention exchanges data (Ulysses: an all-to-all from a sequence split to a head split and
back; ring: an all-gather of keys and values).

What that means for token merging: every rank merges its own chunk. A chunk of raster-ordered
image tokens is a band of whole token rows when the rows divide evenly among the ranks, so an
adapter that reads the grid from the positional ids of its own chunk tiles each band by itself:
tiles never straddle two ranks, every rank has the same band and therefore keeps the same number
of tokens (the all-to-all needs equal lengths), and when a band holds whole tile rows the tiles
are exactly the single-process ones. Attention then runs over every rank's merged tokens, so the
result equals the single-process result up to float reordering. This needs

- an adapter that declares it (``ModelAdapter.context_parallel``): the grid is read from ids
  that are split with the tokens, and a merge plan depends on its tile's tokens only;
- the split at the model's own forward (hidden states and ids cut before tokenreduce's wrapper
  reads them), which is where Flux's ``_cp_plan`` puts it; plans that split inside the model
  (Wan, Qwen-Image: at the first block) would hand the blocks a share of the grid the wrapper saw;
- equal chunks (not ``ulysses_anything`` / ``ring_anything``, whose chunks differ in length).

Anything else is refused with a ``ValueError`` (at ``apply`` when parallelism is already on, else
at the first call after ``enable_parallelism``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: diffusers' name for the hook that splits a module's inputs, for the module id ``""`` (the model).
ENTRY_SPLIT_HOOK = "cp_input---"


def supported_adapters() -> str:
    """The registered adapters that declare context parallelism, for messages."""
    from tokenreduce.manager import get_registry

    registry = get_registry()
    names = [
        n for n in registry.names("adapter") if getattr(registry.get("adapter", n), "context_parallel", False)
    ]
    return ", ".join(sorted(names)) or "none registered"


def context_parallel_config(model: nn.Module) -> Any:
    """The ``ContextParallelConfig`` enabled on ``model``, or ``None``."""
    return getattr(getattr(model, "_parallel_config", None), "context_parallel_config", None)


def degree(config: Any) -> int:
    """Number of ranks the sequence is split across."""
    return int(config.ring_degree) * int(config.ulysses_degree)


def splits_at_entry(model: nn.Module) -> bool:
    """Whether diffusers' split hook on the model itself cuts ``hidden_states`` (so the model's
    own forward, and tokenreduce's wrapper on it, receive one rank's chunk)."""
    registry = getattr(model, "_diffusers_hook", None)
    hooks = getattr(registry, "hooks", {}) if registry is not None else {}
    hook = hooks.get(ENTRY_SPLIT_HOOK)
    return "hidden_states" in getattr(hook, "metadata", {})


def unsupported(model: nn.Module, adapter: Any) -> str | None:
    """Why tokenreduce cannot run on ``model`` under its context parallelism (``None``: it can,
    or none is enabled)."""
    config = context_parallel_config(model)
    if config is None:
        return None
    name = type(model).__name__
    if not getattr(adapter, "context_parallel", False):
        return (
            f"the {adapter.name} adapter does not support context parallelism (enabled on this {name}); "
            "token merging runs with context parallelism on adapters whose models split the sequence "
            f"at their own forward ({supported_adapters()}). Disable one of them"
        )
    if getattr(config, "ulysses_anything", False) or getattr(config, "ring_anything", False):
        return (
            "context parallelism with ulysses_anything/ring_anything gives ranks chunks of different "
            "lengths, so the ranks' token grids differ; use plain ulysses_degree/ring_degree"
        )
    if not splits_at_entry(model):
        return (
            f"this {name}'s context-parallel plan does not split hidden_states at the model's own "
            "forward: its blocks would see a share of the token grid tokenreduce reads; use the "
            "model's default _cp_plan"
        )
    return None


def check(model: nn.Module, adapter: Any) -> None:
    """``ValueError`` when :func:`unsupported` finds a reason."""
    reason = unsupported(model, adapter)
    if reason is not None:
        raise ValueError(reason)


class Guard:
    """Checked at every denoiser call (parallelism may be enabled after ``apply``): one attribute
    read per call; the full check runs again only when the model's config object changes."""

    __slots__ = ("adapter", "checked", "model")

    def __init__(self, model: nn.Module, adapter: Any) -> None:
        self.model, self.adapter = model, adapter
        self.checked: Any = None

    def __call__(self) -> None:
        config = context_parallel_config(self.model)
        if config is None or config is self.checked:
            return
        check(self.model, self.adapter)
        self.checked = config


def gathered_inverse(inverse: torch.Tensor, ranks: int) -> torch.Tensor:
    """The permutation back to raster order of ``ranks`` equal chunks gathered in rank order, each
    in the region order that ``inverse`` undoes for one chunk."""
    n = inverse.numel()
    offsets = torch.arange(ranks, device=inverse.device, dtype=inverse.dtype) * n
    return (inverse.unsqueeze(0) + offsets.unsqueeze(1)).reshape(-1)


def band_hint(model: nn.Module) -> str | None:
    """A hint for a grid that cannot be read under context parallelism (``None`` when off)."""
    config = context_parallel_config(model)
    if config is None:
        return None
    return (
        f"under context parallelism each of the {degree(config)} ranks receives a contiguous chunk of "
        "the image tokens, which must be whole token rows: the image's token rows (its height in "
        f"pixels over the pixels per token row) must be a multiple of {degree(config)}"
    )
