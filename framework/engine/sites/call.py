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
from tokenreduce.parallel import band_hint, gathered_inverse

Wrapper = Callable[[Callable[..., Any]], Callable[..., Any]]


class CallContext:
    """Set by the denoiser's forward wrapper, read by the block wrappers of the same call."""

    def __init__(self) -> None:
        self.on = False  # inside a wrapped denoiser call with the runtime enabled
        self.text_len = 0
        self.grid: tuple[int, int] = (0, 0)
        self.sequence = False  # image tokens in region (tile) order in this call
        # (group name, image first) -> (plan, first RoPE table, merged tables); reset every call, so
        # within a call every block of a group reuses the table and a new plan or table rebuilds it.
        self.rope: dict[tuple[str, bool], tuple[MergePlan, torch.Tensor, Any]] = {}


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
        # split single-stream blocks: how `norm` laid out the merged sequence for `attn` and
        # `proj_out`: "cat" = [text; merged image]; "prefix" = [text; first image tokens] (a view);
        # "image_first" = [merged image; text] (merged before the modulation, no concatenation)
        self.route = "cat"

    def attend(
        self,
        plan: MergePlan,
        text_len: int,
        original: Callable[..., Any],
        *args: Any,
        image_first: bool = False,
        **kwargs: Any,
    ) -> Any:
        """``original(*args, **kwargs)``: attention over ``text_len`` text keys and the merged image
        keys (the model's order, or image first when ``image_first``), size-weighted when enabled."""
        weighting = self.weighting
        if weighting is None:
            return original(*args, **kwargs)
        assert self.weights is not None, "a size-weighted site has a key-weights cache"
        weights = self.weights.get(plan, text_len, self.text_first and not image_first)
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


#: ``(grid, args, kwargs) -> (args, kwargs, inverse)`` with the image tokens (and everything indexed
#: by them) in region order, or ``None`` to keep raster order (see ``Runtime.region_order``).
Reorder = Callable[
    [tuple[int, ...], tuple[Any, ...], dict[str, Any]], tuple[tuple, dict, torch.Tensor] | None
]


def to_raster(out: Any, inverse: torch.Tensor) -> Any:
    """The denoiser's output (a tuple or an output object) with its sample back in raster order.

    Under context parallelism the model may gather the ranks' chunks inside its forward
    (``proj_out``): the sample then holds every rank's chunk, each in its own region order."""
    sample = out[0] if isinstance(out, tuple) else out.sample
    ranks = sample.shape[1] // inverse.numel()
    if ranks > 1:
        inverse = gathered_inverse(inverse, ranks)
    if isinstance(out, tuple):
        return (sample.index_select(1, inverse), *out[1:])
    out.sample = sample.index_select(1, inverse)
    return out


def wrap_denoiser(
    model: nn.Module,
    runtime: Runtime,
    ctx: CallContext,
    read: Callable[..., CallInfo],
    what: str,
    reorder: Reorder | None = None,
) -> Wrapper:
    """The denoiser's forward: advance the step clock and set the per-call context.

    ``read`` takes the forward's arguments and returns the call's timestep, token grid and text
    length (it raises ``ValueError`` for inputs the adapter cannot serve). The arguments are passed
    on unchanged, unless ``reorder`` hands the blocks their image tokens region by region for the
    whole call (merge and unmerge then need no gather in any block); the output is put back in
    raster order.
    """

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def forward(*args: Any, **kwargs: Any) -> Any:
            if not runtime.switched_on:
                return original(*args, **kwargs)
            try:
                info = read(*args, **kwargs)
            except ValueError as exc:
                if runtime.parallel_guard is not None:
                    runtime.parallel_guard()  # parallelism this adapter cannot serve: say that
                hint = band_hint(model)
                if hint is None:
                    raise
                raise ValueError(f"{exc}; {hint}") from None
            begin_call(runtime, info.timestep)  # the clock runs on steps that do not merge too
            if not runtime.enabled:
                return original(*args, **kwargs)
            if getattr(model, "gradient_checkpointing", False) and torch.is_grad_enabled():
                raise ValueError(
                    f"{what} token merging does not support gradient checkpointing; disable one of them"
                )
            ctx.grid, ctx.text_len, ctx.rope = info.grid, info.text_len, {}
            moved = None if reorder is None else reorder(info.grid, args, kwargs)
            ctx.sequence = moved is not None
            if moved is not None:
                args, kwargs, inverse = moved
            ctx.on = True
            try:
                out = original(*args, **kwargs)
            finally:
                ctx.on = False
            return out if moved is None else to_raster(out, inverse)

        return forward

    return make
