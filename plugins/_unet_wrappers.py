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
from tokenreduce.engine.runtime import Group, Runtime
from tokenreduce.interfaces import MergePlan

Forward = Callable[..., Any]
Factory = Callable[[Forward], Forward]


class GridCell:
    """The token grid of the latest input of one ``Transformer2DModel`` (read by its blocks)."""

    __slots__ = ("grid",)

    def __init__(self, grid: tuple[int, int]) -> None:
        self.grid = grid


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


def whole_block(runtime: Runtime, group: Group, grid: GridCell, source: Forward | None) -> Factory:
    """``BasicTransformerBlock`` forward on merged tokens: ``x + U(block(M x) - M x)``.

    A stack of one block. ``source`` maps the block input to the tokens the plan is computed from
    (the block's first norm) or is ``None`` to use the input itself.
    """
    return stack_enter(runtime, group, grid, StackCell(), source, last=True)


def plan_at_block_input(runtime: Runtime, group: Group, grid: GridCell, cell: PlanCell) -> Factory:
    """``BasicTransformerBlock`` forward: compute the block's plan from its raw input, run the block."""

    def make(original: Forward) -> Forward:
        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if runtime.enabled:
                cell.plan = runtime.plan(group, hidden_states, grid.grid)
            return original(hidden_states, *args, **kwargs)

        return forward

    return make


def merged_site(runtime: Runtime, group: Group, grid: GridCell, cell: PlanCell, plans: bool) -> Factory:
    """``attn1`` / ``attn2`` / ``ff`` forward on merged tokens: ``U(f(M n, ...))``.

    ``plans``: this is the block's first site and computes the plan from the tokens it receives;
    otherwise it uses the plan already in ``cell``. Other arguments (text states) pass untouched.
    """

    def make(original: Forward) -> Forward:
        if plans:

            def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
                if not runtime.enabled:
                    return original(hidden_states, *args, **kwargs)
                plan = cell.plan = runtime.plan(group, hidden_states, grid.grid)
                return plan.unmerge(original(plan.merge(hidden_states), *args, **kwargs))

        else:

            def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
                if not runtime.enabled:
                    return original(hidden_states, *args, **kwargs)
                plan = cell.plan
                return plan.unmerge(original(plan.merge(hidden_states), *args, **kwargs))

        return forward

    return make


def kv_only_site(runtime: Runtime, group: Group, grid: GridCell, cell: PlanCell, plans: bool) -> Factory:
    """``attn1`` forward with full-length queries and keys/values from the merged tokens (no unmerge)."""

    def make(original: Forward) -> Forward:
        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if not runtime.enabled:
                return original(hidden_states, *args, **kwargs)
            plan = runtime.plan(group, hidden_states, grid.grid) if plans else cell.plan
            kwargs["encoder_hidden_states"] = plan.merge(hidden_states)
            return original(hidden_states, *args, **kwargs)

        return forward

    return make


class StackCell:
    """What the first block of a merged stack hands to the last one within one call."""

    __slots__ = ("plan", "residual")

    def __init__(self) -> None:
        self.residual: torch.Tensor | None = None
        self.plan: MergePlan | None = None


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
            plan = runtime.plan(group, hidden_states, grid.grid, source)
            merged = plan.merge(hidden_states)
            out = original(merged, *args, **kwargs)
            if merged is hidden_states:  # nothing merged at this layer
                cell.plan = None
                return out
            if last:
                return hidden_states + plan.unmerge(out - merged)
            # Only the input is held through the stack; ``M x`` is recomputed at the exit (one small
            # batched matmul) rather than kept alive next to it.
            cell.residual, cell.plan = hidden_states, plan
            return out

        return forward

    return make


def stack_exit(runtime: Runtime, cell: StackCell) -> Factory:
    """Last ``BasicTransformerBlock`` of a merged stack: unmerge the stack's update."""

    def make(original: Forward) -> Forward:
        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            out = original(hidden_states, *args, **kwargs)
            plan = cell.plan
            if not runtime.enabled or plan is None:
                return out
            residual = cell.residual
            cell.residual = cell.plan = None  # do not hold activations past the call
            return residual + plan.unmerge(out - plan.merge(residual))

        return forward

    return make
