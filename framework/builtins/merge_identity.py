"""``identity`` merger: every piece of the plumbing runs, nothing is reduced (overhead measurement)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from tokenreduce.interfaces import MergePlan, Merger
from tokenreduce.layout import Layout
from tokenreduce.params import StrictParams


class PassThroughPlan(MergePlan):
    """``merge`` and ``unmerge`` return their input; every token keeps its own position."""

    # Not declared convex: adapters then take their generic path, which reproduces the unmodified
    # model bit for bit (the fused paths reorder float operations).
    convex = False

    def __init__(self, num_tokens: int, device: torch.device) -> None:
        self.positions = torch.arange(num_tokens, device=device)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        return y


class IdentityMerger(Merger):
    name = "identity"
    # No destinations are used, so the runtime skips selection entirely.
    needs_destinations = False
    needs_features = False
    hard: ClassVar[bool] = True
    # Nothing is merged: plans leave ``sizes`` None (every size 1), so size weighting is a no-op.
    gives_sizes: ClassVar[bool] = True
    # Tokens stay in raster order: a permuted sequence changes attention's summation order, and the
    # identity merger must reproduce the unmodified model exactly.
    any_token_order: ClassVar[bool] = False

    class Params(StrictParams):
        name: Literal["identity"] = "identity"

    def plan(
        self,
        x: torch.Tensor,
        features: torch.Tensor | None,
        destinations: torch.Tensor | None,
        layout: Layout,
    ) -> MergePlan:
        return PassThroughPlan(x.shape[1], x.device)
