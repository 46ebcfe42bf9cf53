"""Per-call state shared by a denoiser's forward wrapper and the site wrappers of its blocks."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tokenreduce.api import begin_call
from tokenreduce.engine.attention import KeyWeightsCache, SizeWeighting
from tokenreduce.engine.runtime import Group, Runtime
from tokenreduce.interfaces import MergePlan

Wrapper = Callable[[Callable[..., Any]], Callable[..., Any]]


class CallContext:
    """Set by the denoiser's forward wrapper, read by the block wrappers of the same call."""

    def __init__(self) -> None:
        self.on = False  # inside a wrapped denoiser call with the runtime enabled
        self.text_len = 0
        self.grid: tuple[int, int] = (0, 0)
        # group name -> (plan, first RoPE table, merged tables); reset every call, so within a call
        # every block of a group reuses the table and a new plan or new RoPE table rebuilds it.
        self.rope: dict[str, tuple[MergePlan, torch.Tensor, Any]] = {}


class Site:
    """One merged block: the runtime, its sharing group and (single-stream blocks) this call's plan.

    ``weighting``: the size weighting of the attention module the site wraps (``None`` when off);
    ``weights``: the key weights of the group's plan, shared by the group's sites; ``text_first``:
    whether the model's joint attention puts the text keys before the image keys.
    """

    def __init__(
        self,
        ctx: CallContext,
        runtime: Runtime,
        group: Group,
        weighting: SizeWeighting | None = None,
        weights: KeyWeightsCache | None = None,
        text_first: bool = True,
    ) -> None:
        self.ctx, self.runtime, self.group = ctx, runtime, group
        self.plan: MergePlan | None = None  # split single-stream blocks: set by `norm`, used after
        self.weighting, self.weights, self.text_first = weighting, weights, text_first

    def attend(
        self, plan: MergePlan, text_len: int, original: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        """``original(*args, **kwargs)``: attention over ``text_len`` text keys and the merged image
        keys, size-weighted when enabled."""
        weighting = self.weighting
        if weighting is None:
            return original(*args, **kwargs)
        weights = self.weights.get(plan, text_len, self.text_first)
        return weighting.call(weights, original, *args, **kwargs)


@dataclass(frozen=True)
class CallInfo:
    """What the denoiser's forward wrapper reads from its arguments: host values only."""

    timestep: Any
    grid: tuple[int, int]
    text_len: int


def no_mask(attention_mask: Any, what: str) -> None:
    if attention_mask is not None:
        raise ValueError(
            f"{what} token merging does not support an attention_mask (the merged sequence is shorter)"
        )


def wrap_denoiser(
    model: nn.Module,
    runtime: Runtime,
    ctx: CallContext,
    read: Callable[..., CallInfo],
    what: str,
) -> Wrapper:
    """The denoiser's forward: advance the step clock and set the per-call context.

    ``read`` takes the forward's arguments and returns the call's timestep, token grid and text
    length (it raises ``ValueError`` for inputs the adapter cannot serve). The arguments are passed
    on unchanged.
    """

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def forward(*args: Any, **kwargs: Any) -> Any:
            if not runtime.enabled:
                return original(*args, **kwargs)
            if getattr(model, "gradient_checkpointing", False) and torch.is_grad_enabled():
                raise ValueError(
                    f"{what} token merging does not support gradient checkpointing; disable one of them"
                )
            info = read(*args, **kwargs)
            begin_call(runtime, info.timestep)
            ctx.grid, ctx.text_len, ctx.rope = info.grid, info.text_len, {}
            ctx.on = True
            try:
                return original(*args, **kwargs)
            finally:
                ctx.on = False

        return forward

    return make
