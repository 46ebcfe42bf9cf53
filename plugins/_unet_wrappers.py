"""The per-call wrappers the SDXL adapter installs (the hot path).

Each factory returns ``make(original) -> forward`` for :meth:`PatchSet.wrap_forward`. The
wrappers read only plain objects resolved at install time (the runtime, the block's group, two
small state cells) and call the original directly while the runtime is disabled. Per transformer
block and call they add: the wrapper frame, ``runtime.plan`` (a cache hit on most calls),
``plan.merge`` and ``plan.unmerge``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tokenreduce.api import begin_call
from tokenreduce.engine.attention import KeyWeightsCache, SizeWeighting
from tokenreduce.engine.runtime import Group, Runtime
from tokenreduce.interfaces import MergePlan

Forward = Callable[..., Any]
Factory = Callable[[Forward], Forward]


class GridCell:
    """The token grid of the latest input of one ``Transformer2DModel`` (read by its blocks), and
    whether its tokens are in tile order (``sequence``) in the current call."""

    __slots__ = ("grid", "sequence", "tiles")

    def __init__(self, grid: tuple[int, int]) -> None:
        self.grid = grid
        self.sequence = False
        self.tiles: tuple[int, int] | None = None


def to_tiles(x: torch.Tensor, tiles: tuple[int, int]) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H*W, C)`` tokens tile by tile (one copy, as the raster reshape)."""
    b, c, h, w = x.shape
    th, tw = tiles
    return x.view(b, c, h // th, th, w // tw, tw).permute(0, 2, 4, 3, 5, 1).reshape(b, h * w, c)


def from_tiles(x: torch.Tensor, height: int, width: int, tiles: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`to_tiles`: ``(B, H*W, C)`` tile-ordered tokens -> contiguous ``(B, C, H, W)``."""
    b, _, c = x.shape
    th, tw = tiles
    x = x.view(b, height // th, width // tw, th, tw, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, height, width)


def tokens_in_tiles(runtime: Runtime, module: Any, cell: GridCell) -> Factory:
    """``Transformer2DModel._operate_on_continuous_inputs``: emit the tokens tile by tile when the
    layout allows it, so the merged blocks' merge and unmerge need no gather. The tile order is
    folded into the ``(B, C, H, W) -> (B, N, C)`` copy the model makes anyway (no added kernel)."""

    def make(original: Forward) -> Forward:
        def forward(hidden_states: torch.Tensor) -> tuple[torch.Tensor, int]:
            tiles = runtime.tiles(tuple(hidden_states.shape[-2:])) if runtime.enabled else None
            cell.sequence, cell.tiles = tiles is not None, tiles
            if tiles is None:
                return original(hidden_states)
            x = module.norm(hidden_states)
            if not module.use_linear_projection:
                x = module.proj_in(x)
                return to_tiles(x, tiles), x.shape[1]
            inner_dim = x.shape[1]
            return module.proj_in(to_tiles(x, tiles)), inner_dim

        return forward

    return make


def tokens_from_tiles(module: Any, cell: GridCell) -> Factory:
    """``Transformer2DModel._get_output_for_continuous_inputs``: the inverse of :func:`tokens_in_tiles`."""

    def make(original: Forward) -> Forward:
        def forward(
            hidden_states: torch.Tensor,
            residual: torch.Tensor,
            batch_size: int,
            height: int,
            width: int,
            inner_dim: int,
        ) -> torch.Tensor:
            tiles = cell.tiles
            if tiles is None:
                return original(hidden_states, residual, batch_size, height, width, inner_dim)
            cell.sequence, cell.tiles = False, None
            if not module.use_linear_projection:
                return module.proj_out(from_tiles(hidden_states, height, width, tiles)) + residual
            return from_tiles(module.proj_out(hidden_states), height, width, tiles) + residual

        return forward

    return make


class PlanCell:
    """The plan of the current call of one block, shared by the block's sites."""

    __slots__ = ("plan",)

    def __init__(self) -> None:
        self.plan: MergePlan | None = None


def begin_denoiser_call(runtime: Runtime) -> Factory:
    """UNet forward: advance the step clock before any block runs."""

    def make(original: Forward) -> Forward:
        def forward(sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
            if runtime.switched_on:  # the clock runs on steps that do not merge too
                begin_call(runtime, timestep)
            return original(sample, timestep, *args, **kwargs)

        return forward

    return make


def track_grid(runtime: Runtime, cell: GridCell) -> Factory:
    """``Transformer2DModel`` forward: record the ``(H, W)`` of its ``(B, C, H, W)`` input."""

    def make(original: Forward) -> Forward:
        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if runtime.enabled:
                cell.grid = (hidden_states.shape[-2], hidden_states.shape[-1])
            return original(hidden_states, *args, **kwargs)

        return forward

    return make


def whole_block(
    runtime: Runtime, group: Group, grid: GridCell, source: Forward | None, cell: StackCell | None = None
) -> Factory:
    """``BasicTransformerBlock`` forward on merged tokens: ``x + U(block(M x) - M x)``.

    A stack of one block. ``source`` maps the block input to the tokens the plan is computed from
    (the block's first norm) or is ``None`` to use the input itself.
    """
    return stack_enter(runtime, group, grid, cell or StackCell(), source, last=True)


def plan_at_block_input(runtime: Runtime, group: Group, grid: GridCell, cell: PlanCell) -> Factory:
    """``BasicTransformerBlock`` forward: compute the block's plan from its raw input, run the block."""

    def make(original: Forward) -> Forward:
        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if runtime.enabled:
                cell.plan = runtime.plan(group, hidden_states, grid.grid, sequence=grid.sequence)
            return original(hidden_states, *args, **kwargs)

        return forward

    return make


def merged_site(
    runtime: Runtime,
    group: Group,
    grid: GridCell,
    cell: PlanCell,
    plans: bool,
    weighting: tuple[SizeWeighting, KeyWeightsCache] | None = None,
) -> Factory:
    """``attn1`` / ``attn2`` / ``ff`` forward on merged tokens: ``U(f(M n, ...))``.

    ``plans``: this is the block's first site and computes the plan from the tokens it receives;
    otherwise it uses the plan already in ``cell``. Other arguments (text states) pass untouched.
    ``weighting`` (``attn1`` with size weighting): the merged keys weigh their group sizes.
    """

    def make(original: Forward) -> Forward:
        if weighting is not None:
            sized, cache = weighting

            def run(plan: MergePlan, merged: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
                return sized.call(cache.get(plan), original, merged, *args, **kwargs)

        else:

            def run(plan: MergePlan, merged: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
                return original(merged, *args, **kwargs)

        if plans:

            def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
                if not runtime.enabled:
                    return original(hidden_states, *args, **kwargs)
                plan = cell.plan = runtime.plan(group, hidden_states, grid.grid, sequence=grid.sequence)
                return plan.unmerge(run(plan, plan.merge(hidden_states), *args, **kwargs))

        else:

            def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
                if not runtime.enabled:
                    return original(hidden_states, *args, **kwargs)
                plan = cell.plan
                assert plan is not None, "the block's first site planned this call"
                return plan.unmerge(run(plan, plan.merge(hidden_states), *args, **kwargs))

        return forward

    return make


def kv_only_site(runtime: Runtime, group: Group, grid: GridCell, cell: PlanCell, plans: bool) -> Factory:
    """``attn1`` forward with full-length queries and keys/values from the merged tokens (no unmerge)."""

    def make(original: Forward) -> Forward:
        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if not runtime.enabled:
                return original(hidden_states, *args, **kwargs)
            plan = (
                runtime.plan(group, hidden_states, grid.grid, sequence=grid.sequence) if plans else cell.plan
            )
            assert plan is not None, "the block's first site planned this call"
            kwargs["encoder_hidden_states"] = plan.merge(hidden_states)
            return original(hidden_states, *args, **kwargs)

        return forward

    return make


class StackCell:
    """What the first block of a merged stack hands to the last one within one call.

    ``running``: the plan the stack's blocks run on while they do (read by size-weighted
    self-attention); ``weights``: its key weights, built once per plan (shared by the group).
    """

    __slots__ = ("merged", "plan", "residual", "running", "weights")

    def __init__(self, weights: KeyWeightsCache | None = None) -> None:
        self.residual: torch.Tensor | None = None
        self.merged: torch.Tensor | None = None
        self.plan: MergePlan | None = None
        self.running: MergePlan | None = None
        self.weights = weights if weights is not None else KeyWeightsCache()


def weighted_self_attention(runtime: Runtime, cell: StackCell, weighting: SizeWeighting) -> Factory:
    """``attn1`` of a block inside a merged stack: keys weigh their group sizes (size weighting)."""

    def make(original: Forward) -> Forward:
        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            plan = cell.running
            if plan is None or not runtime.enabled:
                return original(hidden_states, *args, **kwargs)
            return weighting.call(cell.weights.get(plan), original, hidden_states, *args, **kwargs)

        return forward

    return make


def stack_enter(
    runtime: Runtime, group: Group, grid: GridCell, cell: StackCell, source: Forward | None, last: bool
) -> Factory:
    """First ``BasicTransformerBlock`` of a ``Transformer2DModel``: merge once for the whole stack.

    The blocks of one ``Transformer2DModel`` run back to back on one grid, so the stack runs on
    merged tokens from its first block to its last, and only the stack's update is unmerged:
    ``x + U(blocks(M x) - M x)``. The blocks in between are not wrapped at all. ``last``: the stack
    has a single block, which then also unmerges.
    """

    def make(original: Forward) -> Forward:
        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if not runtime.enabled:
                return original(hidden_states, *args, **kwargs)
            plan = runtime.plan(group, hidden_states, grid.grid, source, sequence=grid.sequence)
            merged = plan.merge(hidden_states)
            cell.running = None if merged is hidden_states else plan
            out = original(merged, *args, **kwargs)
            if merged is hidden_states:  # nothing merged at this layer
                cell.plan = None
                return out
            if last:
                cell.running = None
                return plan.residual_update(hidden_states, merged, out)
            # ``M x`` is held through the stack (a fraction of the input's size) rather than
            # recomputed at the exit: one kernel fewer per stack and call.
            cell.residual, cell.merged, cell.plan = hidden_states, merged, plan
            return out

        return forward

    return make


def stack_exit(runtime: Runtime, cell: StackCell) -> Factory:
    """Last ``BasicTransformerBlock`` of a merged stack: unmerge the stack's update."""

    def make(original: Forward) -> Forward:
        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            out = original(hidden_states, *args, **kwargs)
            cell.running = None
            plan = cell.plan
            if not runtime.enabled or plan is None:
                return out
            residual, merged = cell.residual, cell.merged
            assert residual is not None and merged is not None, "the stack's first block set them"
            cell.residual = cell.merged = cell.plan = None  # do not hold activations past the call
            return plan.residual_update(residual, merged, out)

        return forward

    return make
