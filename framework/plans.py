"""Reusable :class:`MergePlan` implementations for mergers whose maps are per-region matrices."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tokenreduce.interfaces import MergePlan
from tokenreduce.layout import Layout


class RegionLinearPlan(MergePlan):
    """Merge and unmerge as block-diagonal batched matmuls over regions, with precomputed weights.

    ``merge_weights``: ``(B, R, k, S)``; ``unmerge_weights``: ``(B, R, S, k)``, both in the tokens'
    dtype. ``merge``/``unmerge`` are one gather, one batched matmul and one reshape each.
    """

    def __init__(
        self,
        merge: torch.Tensor,
        unmerge: torch.Tensor,
        layout: Layout,
        positions: torch.Tensor,
        sizes: Callable[[], torch.Tensor] | None = None,
        convex: bool = False,
    ) -> None:
        self.merge_weights = merge
        self.unmerge_weights = unmerge
        self.layout = layout
        self.positions = positions
        self._sizes_of = sizes
        self._sizes: torch.Tensor | None = None
        self.convex = convex

    @property
    def sizes(self) -> torch.Tensor | None:  # type: ignore[override]
        """Group sizes, computed on first use (only size-weighted attention reads them)."""
        if self._sizes is None and self._sizes_of is not None:
            self._sizes = self._sizes_of()
        return self._sizes

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        return self.layout.compact_slots(self.merge_weights @ self.layout.to_regions(x))

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        return self.layout.from_regions(self.unmerge_weights @ self.layout.expand_slots(y))

    def unmerge_into(self, y: torch.Tensor, out: torch.Tensor) -> None:
        layout = self.layout
        if not (
            layout.regions.sequential and layout.all_slots_real and out.is_contiguous() and y.is_contiguous()
        ):
            out.copy_(self.unmerge(y))
            return
        # Tokens in region order, every slot real: one batched matmul straight into ``out``.
        u = self.unmerge_weights
        b, r, s, k = u.shape
        c = y.shape[-1]
        torch.bmm(u.reshape(b * r, s, k), y.view(b * r, k, c), out=out.view(b * r, s, c))


def group_sizes(assign: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``(B, N')`` float32 group sizes from an assignment ``(B, R, S, k)``: its column sums, one per
    real destination (padding sources have zero rows and add nothing)."""
    colsum = assign.float().sum(dim=-2).unsqueeze(-1)  # (B, R, k, 1)
    return layout.compact_slots(colsum).squeeze(-1)
