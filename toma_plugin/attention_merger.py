"""ToMA attention merger: merge and unmerge as per-region linear maps built from a soft assignment.

Per region and sample, ``A[i, j] = softmax_j(cos(x_i, d_j) / tau)`` spreads each source token over
the destinations. Merging takes column-normalised weighted means ``M = (A / colsum(A))^T``;
unmerging applies ``U = A`` (``transpose``) or the pseudo-inverse of ``M`` (``pinv``). Both maps
are computed once in :meth:`AttentionMerger.plan` and applied as block-diagonal batched matmuls.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from tokenreduce.interfaces import MergePlan, Merger
from tokenreduce.layout import Layout
from tokenreduce.params import StrictParams
from tokenreduce.plans import RegionLinearPlan, group_sizes

#: Tikhonov term of the pseudo-inverse; ``M M^T`` has eigenvalues of the order of 1 / group size.
PINV_EPS = 1e-6


def soft_assignment(
    features: torch.Tensor, destinations: torch.Tensor, layout: Layout, temperature: float
) -> torch.Tensor:
    """``A``: ``(B, R, S, k)`` float32; unreal destination slots get 0, padding source rows are 0."""
    b, r, _, c = features.shape
    k = destinations.shape[1]
    dest_feats = features.gather(2, destinations.view(1, r, k, 1).expand(b, r, k, c))
    # Cosines in float32 before the division: at temperature 1e-3 a bfloat16 cosine's rounding
    # (0.004 near 1) would be 4 logit units.
    cosines = features @ dest_feats.transpose(-1, -2)
    logits = cosines.to(torch.promote_types(cosines.dtype, torch.float32)) / temperature
    if layout.compact is not None:  # some slots are unreal (host-side fact of the layout: no device read)
        logits = logits.masked_fill(~layout.slot_valid.unsqueeze(1), float("-inf"))
    assign = torch.softmax(logits, dim=-1)
    if layout.regions.ragged:
        assign = assign * layout.regions.valid.unsqueeze(-1).to(assign.dtype)
    return assign


def merge_map(assign: torch.Tensor) -> torch.Tensor:
    """``M = (A / colsum(A))^T``: ``(B, R, k, S)``, every real row a convex combination."""
    # A real destination receives at least 1/k from itself, so only unreal slots hit the clamp.
    colsum = assign.sum(dim=-2, keepdim=True).clamp_min(torch.finfo(assign.dtype).tiny)
    return (assign / colsum).transpose(-1, -2)


def pinv_unmerge_map(merge: torch.Tensor) -> torch.Tensor:
    """``U = M^T (M M^T + eps I)^-1``: ``(B, R, S, k)``, via a Cholesky solve (no host sync)."""
    k = merge.shape[-2]
    gram = merge @ merge.transpose(-1, -2)
    gram = gram + PINV_EPS * torch.eye(k, dtype=gram.dtype, device=gram.device)
    chol, _ = torch.linalg.cholesky_ex(gram)
    return torch.cholesky_solve(merge, chol).transpose(-1, -2)


class AttentionMerger(Merger):
    name = "attention"
    any_token_order: ClassVar[bool] = True
    output = "destinations"
    #: soft weights: ``unmerge(merge(x)) == x`` on merge groups only to a tolerance (at the default temperature)
    hard: ClassVar[bool] = False
    gives_sizes: ClassVar[bool] = True

    class Params(StrictParams):
        name: Literal["attention"] = "attention"
        temperature: float = Field(
            0.001,
            gt=0.0,
            description="Softmax temperature tau of the soft assignment (scores = cosine / tau); smaller is harder.",
        )
        unmerge: Literal["transpose", "pinv"] = Field(
            "transpose",
            description="Unmerge map: the assignment itself ('transpose') or the pseudo-inverse of the merge ('pinv').",
        )

    params: Params

    def plan(
        self, x: torch.Tensor, features: torch.Tensor, destinations: torch.Tensor, layout: Layout
    ) -> MergePlan:
        assign = soft_assignment(features, destinations, layout, self.params.temperature)
        # Weights in at least float32 (float64 models get float64, so merge rows sum to 1 to their
        # precision: adapters may merge before a per-channel affine map, see ``MergePlan.convex``).
        assign = assign.to(torch.promote_types(x.dtype, torch.float32))
        merge = merge_map(assign)
        unmerge = assign if self.params.unmerge == "transpose" else pinv_unmerge_map(merge)
        return RegionLinearPlan(
            merge=merge.to(x.dtype),
            unmerge=unmerge.to(x.dtype),
            layout=layout,
            positions=layout.global_destinations(destinations),
            sizes=lambda: group_sizes(assign, layout),
            convex=True,  # merge rows are weighted means
        )
