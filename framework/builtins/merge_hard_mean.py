"""``hard_mean`` merger: each token joins its most similar destination; a merged token is its group's mean.

Per region, the assignment is a one-hot ``(S, k)`` matrix ``A`` (argmax cosine similarity to the
region's destinations; a destination always joins itself). Merging applies ``(A / colsum(A))^T``
and unmerging applies ``A`` (every member gets its group's merged value back), both as batched
matmuls over regions: no scatter, no sort, no host synchronisation.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from tokenreduce.interfaces import MergePlan, Merger
from tokenreduce.layout import Layout
from tokenreduce.params import StrictParams
from tokenreduce.plans import RegionLinearPlan, group_sizes

# Cosine similarity is at most 1: this bonus makes every destination choose itself.
_SELF_BONUS = 4.0


def hard_assignment(features: torch.Tensor, destinations: torch.Tensor, layout: Layout) -> torch.Tensor:
    """One-hot ``(B, R, S, k)`` float32 assignment; padding source rows and unreal destinations are 0."""
    b, r, s, c = features.shape
    k = destinations.shape[1]
    dest_feats = features.gather(2, destinations.reshape(1, r, k, 1).expand(b, r, k, c))
    sim = features @ dest_feats.transpose(-1, -2)  # (B, R, S, k) float32
    # One-hot matrices by comparison with an arange (a static shape, no value checks on the host).
    own = destinations.unsqueeze(1) == torch.arange(s, device=sim.device).view(s, 1)  # (R, S, k)
    sim = sim + _SELF_BONUS * own
    sim = sim.masked_fill(~layout.slot_valid.unsqueeze(1), float("-inf"))
    choice = sim.argmax(dim=-1, keepdim=True)  # (B, R, S, 1)
    assign = (choice == torch.arange(k, device=sim.device)).to(sim.dtype)
    if layout.regions.ragged:
        assign = assign * layout.regions.valid.unsqueeze(-1).to(assign.dtype)
    return assign


class HardMeanMerger(Merger):
    name = "hard_mean"
    any_token_order: ClassVar[bool] = True
    output = "destinations"
    #: exact hard assignments: unmerge(merge(x)) == x for x constant on every group
    hard: ClassVar[bool] = True
    gives_sizes: ClassVar[bool] = True

    class Params(StrictParams):
        name: Literal["hard_mean"] = "hard_mean"

    def plan(
        self, x: torch.Tensor, features: torch.Tensor, destinations: torch.Tensor, layout: Layout
    ) -> MergePlan:
        assign = hard_assignment(features, destinations, layout)
        # Group means in at least float32 (float64 inputs keep float64), then the model dtype.
        weights_dtype = torch.promote_types(x.dtype, torch.float32)
        assign = assign.to(weights_dtype)
        sizes = assign.sum(dim=-2, keepdim=True).clamp_min(1.0)  # unreal destinations have no members
        merge = (assign / sizes).transpose(-1, -2)
        return RegionLinearPlan(
            merge=merge.to(x.dtype),
            unmerge=assign.to(x.dtype),
            layout=layout,
            positions=layout.global_destinations(destinations),
            sizes=lambda: group_sizes(assign, layout),
            convex=True,  # merge rows are weighted means
        )
